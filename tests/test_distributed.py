"""torchrun on CPU (gloo): one training across workers, equal to one process; bf16 on CPU."""
import socket

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


def dump_run(args, dump_dir, nproc=1):
    """train.py through tests/rank_dump.py, under torchrun when nproc > 1."""
    script = [str(tiny.REPO / "tests" / "rank_dump.py"), *args[1:]]
    if nproc > 1:
        script = ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                  "--master_addr", "127.0.0.1", "--master_port", free_port(), *script]
    dump_dir.mkdir(parents=True, exist_ok=True)
    return tiny.run(script, env={"RANK_DUMP_DIR": str(dump_dir)}, timeout=300)


def recipe(tiny_data, tiny_pretrained, save_dir, batch, extra=()):
    args = tiny.glue_recipe(tiny_data, tiny_pretrained, save_dir, updates=6,
                            extra=["--bitfit", *SAME_UPDATES, *extra])
    args[args.index("--batch-size") + 1] = str(batch)
    return args


@pytest.mark.parametrize("ddp_backend", ["legacy_ddp", "c10d"])
def test_two_workers_equal_one_worker_with_twice_the_batch(tiny_data, tiny_pretrained, tmp_path, ddp_backend):
    two = dump_run(recipe(tiny_data, tiny_pretrained, tmp_path / "two", 8, ["--ddp-backend", ddp_backend]),
                   tmp_path / "two_dump", nproc=2)
    assert "torchrun: 2 workers, backend gloo" in two.stdout
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
