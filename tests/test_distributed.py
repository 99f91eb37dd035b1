"""torchrun on CPU (gloo): one training across workers, equal to one process; bf16 on CPU."""
import socket
import sys

import pytest
import torch

import fairseq_ext  # noqa: F401
import tiny

# No dropout and no batch shuffling (--curriculum): one process with batch 2B then sees
# exactly the examples that two workers with batch B see at each update.
SAME_UPDATES = ["--dropout", "0", "--attention-dropout", "0", "--curriculum", "100"]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def torchrun(nproc, port, nnodes=1, node_rank=0):
    return ["-m", "torch.distributed.run", f"--nproc_per_node={nproc}", f"--nnodes={nnodes}",
            f"--node_rank={node_rank}", "--master_addr=127.0.0.1", f"--master_port={port}"]


def dump_run(args, dump_dir, nproc=1, check=True, env=None):
    """train.py through tests/rank_dump.py, under torchrun when nproc > 1."""
    script = [str(tiny.REPO / "tests" / "rank_dump.py"), *args[1:]]
    if nproc > 1:
        script = torchrun(nproc, free_port()) + script
    dump_dir.mkdir(parents=True, exist_ok=True)
    return tiny.run(script, env={"RANK_DUMP_DIR": str(dump_dir), **(env or {})}, timeout=300, check=check)


def recipe(tiny_data, tiny_pretrained, save_dir, batch, extra=()):
    args = tiny.glue_recipe(tiny_data, tiny_pretrained, save_dir, updates=6,
                            extra=["--bitfit", *SAME_UPDATES, *extra])
    args[args.index("--batch-size") + 1] = str(batch)
    return args


@pytest.mark.parametrize("ddp_backend", ["legacy_ddp", "c10d"])
def test_two_workers_equal_one_worker_with_twice_the_batch(tiny_data, tiny_pretrained, tmp_path, ddp_backend):
    # Timed saves at every update on one of the two: the ranks must agree on when to save, or hang.
    timed = ["--save-interval-minutes", "0.0001"] if ddp_backend == "legacy_ddp" else []
    two = dump_run(recipe(tiny_data, tiny_pretrained, tmp_path / "two", 8, ["--ddp-backend", ddp_backend, *timed]),
                   tmp_path / "two_dump", nproc=2)
    assert "torchrun: 2 workers, backend gloo" in two.stdout
    assert ("--save-interval-minutes: saving checkpoint_last" in two.stdout) == bool(timed)
    assert "gradient all-reduce per step: 12 tensors" in two.stdout
    dump_run(recipe(tiny_data, tiny_pretrained, tmp_path / "one", 16), tmp_path / "one_dump")

    rank0 = torch.load(tmp_path / "two_dump" / "rank0.pt")
    rank1 = torch.load(tmp_path / "two_dump" / "rank1.pt")
    single = torch.load(tmp_path / "one_dump" / "rank0.pt")
    pretrained = torch.load(tiny_pretrained)["model"]
    trained = [n for n in rank0 if not torch.equal(rank0[n], pretrained.get(n, torch.empty(0)))]
    assert any("q_proj" not in n and "fc1.bias" in n for n in trained)
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), f"{name} differs between ranks"
        torch.testing.assert_close(rank0[name], single[name], rtol=1e-5, atol=1e-6, msg=name)
        if name in pretrained and "fc" not in name and "layer_norm" not in name:
            assert torch.equal(rank0[name], pretrained[name]), f"frozen {name} changed"


def test_bf16_bitfit_on_cpu_keeps_frozen_weights_and_fp32_masters(tiny_data, tiny_pretrained, tmp_path):
    args = tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path, updates=6, extra=["--bitfit", "--bf16"])
    result = dump_run(args, tmp_path / "dump")
    assert "XLA" not in result.stdout + result.stderr  # --bf16 no longer means TPU
    live = torch.load(tmp_path / "dump" / "rank0.pt")
    checkpoint = torch.load(tmp_path / "checkpoint_last.pt")
    trained = checkpoint["optimizer_history"][-1]["bitfit"]["trainable"]
    pretrained = torch.load(tiny_pretrained)["model"]
    for name, tensor in live.items():
        assert tensor.dtype == torch.bfloat16, name  # the whole model trains in bf16
        if name not in trained:
            assert torch.equal(tensor, pretrained[name].to(torch.bfloat16)), f"frozen {name} changed"
    # fp32 master copies and Adam moments exist for the trained tensors only.
    optimizer_state = checkpoint["last_optimizer_state"]["state"]
    assert len(optimizer_state) == len(trained)
    assert all(s["exp_avg"].dtype == torch.float32 for s in optimizer_state.values())


def test_two_nodes_on_one_machine_train_as_one_job(tiny_data, tiny_pretrained, tmp_path):
    """torchrun --nnodes 2: two launchers, one process each, one training."""
    import os
    import subprocess
    import time

    port = free_port()
    args = recipe(tiny_data, tiny_pretrained, tmp_path / "save", 8)
    script = [str(tiny.REPO / "tests" / "rank_dump.py"), *args[1:]]
    env = dict(os.environ, PYTHONPATH=str(tiny.REPO), OMP_NUM_THREADS="1", RANK_DUMP_DIR=str(tmp_path))
    logs = [tmp_path / f"node{rank}.log" for rank in (0, 1)]
    nodes = []
    for rank, log in enumerate(logs):
        with log.open("w") as output:  # the child keeps its own copy of the descriptor
            nodes.append(subprocess.Popen([sys.executable, *torchrun(1, port, nnodes=2, node_rank=rank), *script],
                                          env=env, cwd=tiny.REPO, stdout=output, stderr=subprocess.STDOUT))
    # Both at once: a node whose launcher fails leaves the other in torchrun's exit barrier for 300 s,
    # so the first failure ends both and the report shows both nodes' output.
    deadline = time.monotonic() + 300
    while (time.monotonic() < deadline and any(node.poll() is None for node in nodes)
           and not any(node.poll() for node in nodes)):
        time.sleep(0.2)
    for node in nodes:
        if node.poll() is None:
            node.kill()
        node.wait()
    outputs = [f"--- node {rank}:\n" + log.read_text()[-3000:] for rank, log in enumerate(logs)]
    assert [node.returncode for node in nodes] == [0, 0], "\n".join(outputs)
    assert "torchrun: 2 workers" in logs[0].read_text()
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert all(torch.equal(rank0[n], rank1[n]) for n in rank0)


def test_a_failing_rank_ends_the_job_with_its_error(tiny_data, tiny_pretrained, tmp_path):
    result = dump_run(recipe(tiny_data, tiny_pretrained, tmp_path / "save", 8), tmp_path / "dump", nproc=2,
                      check=False, env={"FAIL_RANK": "1"})
    assert result.returncode != 0
    assert "injected failure on rank 1" in result.stdout + result.stderr
