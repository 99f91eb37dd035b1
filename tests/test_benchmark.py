"""The benchmark runs and writes valid results (a tiny model; no assertion on time)."""
import json
import os
import subprocess

import pytest
import torch

import tiny
from synthetic_glue import make_glue_dir
from fairseq_ext.plugin.models.pretrained import package_model_folder


def test_benchmark_writes_json_and_markdown(tmp_path):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    env = dict(os.environ, MODELS="bert_tiny", MODES="full bitfit-ofa head", STEPS="2", WARMUP="1",
               BATCH="4", SEQ_LEN="16", DEVICE="cpu", OUTPUT_DIR=str(tmp_path), OMP_NUM_THREADS="1",
               TMPDIR=str(scratch))
    result = subprocess.run(["bash", str(tiny.REPO / "run_scripts" / "benchmark.sh")], env=env,
                            capture_output=True, text=True, cwd=tiny.REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = json.loads((tmp_path / "benchmark.json").read_text())
    assert [r["mode"] for r in rows] == ["full", "bitfit-ofa", "head"]
    fields = {"model", "mode", "device", "batch", "seq_len", "update_ms_median", "step_ms_median", "tokens_per_s",
              "peak_mem_bytes", "trainable", "total", "ratio_to_full", "step_ratio_to_full", "mem_ratio_to_full"}
    for row in rows:
        assert fields <= set(row)
        # an update is train_step plus the loop around it (data loading, logging)
        assert 0 < row["step_ms_median"] <= row["update_ms_median"] and row["peak_mem_bytes"] > 0
        assert abs(row["tokens_per_s"] - 4 * 16 / (row["update_ms_median"] / 1000)) < 0.01 * row["tokens_per_s"] + 1
    full, bitfit, head = rows
    assert full["trainable"] == full["total"] and full["ratio_to_full"] == 1.0
    assert head["trainable"] < bitfit["trainable"] < full["trainable"]
    assert bitfit["ratio_to_full"] == round(bitfit["update_ms_median"] / full["update_ms_median"], 3)
    assert bitfit["step_ratio_to_full"] == round(bitfit["step_ms_median"] / full["step_ms_median"], 3)
    table = (tmp_path / "benchmark.md").read_text()
    assert table.count("| bert_tiny |") == 3
    # the synthetic datasets are removed (DataLoader workers leave torch's pymp-* behind)
    assert not list(scratch.glob("bitfit-bench-*"))


def test_runs_in_one_process_free_each_model_before_the_next():
    """What --process-per round (CUDA's default) relies on: peak memory counted from a
    run's start is that run's alone, because the previous run's model is gone."""
    import gc

    from fairseq_ext.experiments.benchmark import measure_in_process
    from fairseq_ext.training.trainer import BitFitTrainer

    def trainers():  # this test's: another test's in this process is not this one's concern
        return {id(o) for o in gc.get_objects() if isinstance(o, BitFitTrainer)}

    before, rows = trainers(), []
    for row in measure_in_process([("bert_tiny", "full"), ("bert_tiny", "bitfit-ofa")], "cpu", 4, 16, 2, 1, "fp32"):
        assert not trainers() - before
        rows.append(row)
    full, bitfit = rows
    assert full["trainable"] == full["total"] == bitfit["total"] > bitfit["trainable"] > 0


def test_one_child_process_streams_its_rows_and_names_the_failing_run():
    from argparse import Namespace

    import pytest

    from fairseq_ext.experiments.benchmark import run_in_child

    args = Namespace(device="cpu", batch=4, seq_len=16, steps=2, warmup=1)
    pairs = [("bert_tiny", "head"), ("bert_tiny", "bitfit-zz"), ("bert_tiny", "full")]
    rows = []
    with pytest.raises(RuntimeError, match=r"^bert_tiny bitfit-zz failed \(exit 2\); not run: bert_tiny full:"):
        for row in run_in_child(pairs, args, "fp32"):
            rows.append(row)
    assert [(r["model"], r["mode"]) for r in rows] == pairs[:1]


def test_process_per_round_is_refused_on_cpu():
    result = subprocess.run(["python", "-m", "fairseq_ext.experiments.benchmark", "--device", "cpu", "--process-per", "round"],
                            capture_output=True, text=True, cwd=tiny.REPO, env=dict(os.environ, PYTHONPATH=str(tiny.REPO)))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "benchmark.py: error: --process-per round needs --device cuda: on CPU, peak RSS covers the whole process"]


def test_rounds_combine_into_medians_and_paired_ratios():
    from fairseq_ext.experiments.benchmark import add_ratios, combine_rounds

    base = {"model": "m", "mode": "full", "device": "cpu", "batch": 4, "seq_len": 16}
    rounds = [dict(base, update_ms_median=t, step_ms_median=t - 1, peak_mem_bytes=p)
              for t, p in ((10.0, 5), (30.0, 7), (20.0, 6))]
    row = combine_rounds(rounds)
    assert row["update_ms_median"] == 20.0 and row["step_ms_median"] == 19.0
    assert row["peak_mem_bytes"] == 7 and row["rounds"] == 3
    assert row["update_ms_per_round"] == [10.0, 30.0, 20.0]
    assert row["tokens_per_s"] == 4 * 16 / 0.020
    # each round's mode is compared with that round's full run: the slow second round cancels
    faster = combine_rounds([dict(r, mode="bitfit", update_ms_median=r["update_ms_median"] / 2,
                                  step_ms_median=r["step_ms_median"] / 2, peak_mem_bytes=2) for r in rounds])
    add_ratios([row, faster])
    assert faster["ratio_to_full"] == 0.5 and faster["speedup"] == 2.0 and faster["step_ratio_to_full"] == 0.5
    assert faster["mem_ratio_to_full"] == round(2 / 7, 3) and row["ratio_to_full"] == 1.0


def test_cuda_peak_counts_the_peaks_that_fairseq_resets(monkeypatch):
    """fairseq resets the CUDA peak after every update; the run's peak is the largest seen
    before any reset (a fake CUDA counter; 100 bytes were allocated before the run)."""
    import torch

    from fairseq_ext.plugin.patches import cuda_peak_memory

    state = {"allocated": 100, "peak": 100}

    def reset_peak_memory_stats(device=None):
        state["peak"] = state["allocated"]

    def allocate(size):
        state["allocated"] += size
        state["peak"] = max(state["peak"], state["allocated"])

    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: state["peak"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset_peak_memory_stats)
    with cuda_peak_memory() as peak:
        for activations in (500, 900, 300):  # three updates: allocate, free, fairseq resets
            allocate(activations)
            allocate(-activations)
            torch.cuda.reset_peak_memory_stats()
        allocate(50)
    assert peak.peak == 100 + 900
    assert torch.cuda.reset_peak_memory_stats is reset_peak_memory_stats


def test_serving_benchmark_measures_three_ways(tmp_path):
    """Mixed batches, one task per batch, and one task alone, on MiniLM task deltas (a small run)."""
    result = tiny.run(["-m", "fairseq_ext.experiments.serving_benchmark", "--tasks", "3", "--examples", "24",
                       "--batch-size", "8", "--rounds", "1", "--output-dir", str(tmp_path)], timeout=600)
    measured = json.loads((tmp_path / "serving.json").read_text())
    assert measured["tasks"] == 3 and measured["examples"] == 24
    assert set(measured["examples_per_s"]) == {"mixed", "switching", "single"}
    assert all(rate > 0 for rate in measured["examples_per_s"].values())
    assert measured["mixed_over_single"] > 0 and measured["mixed_over_switching"] > 0
    assert "| mixed |" in (tmp_path / "serving.md").read_text() and "mixed / switching" in result.stdout


@pytest.mark.skipif(not tiny.REAL_GLUE.is_dir(), reason="no real GLUE files")
def test_speed_against_the_transformers_loop_runs_every_system_side_by_side(tmp_path):
    """A small run of the real-data comparison on a Hugging Face folder given as --model (MiniLM's own): every
    system, the grouped transformers peer and train.py with a bf16 base included, trains the same parameters
    and reports each epoch's time and dev metrics (no assertion on the times themselves)."""
    glue = tmp_path / "glue" / "STS-B"
    glue.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        lines = (tiny.REAL_GLUE / "STS-B" / f"{split}.tsv").read_text().split("\n")[:41]
        (glue / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    result = tiny.run(["-m", "fairseq_ext.experiments.speed_vs_hf", "--glue-dir", str(glue.parent), "--task", "STS-B",
                       "--modes", "bitfit-all", "--epochs", "1", "--batch", "8", "--bf16-base", "on",
                       "--model", str(package_model_folder()), "--output-dir", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "speed_vs_hf.json").read_text())
    assert [r["system"] for r in rows] == ["transformers", "transformers grouped", "train.py", "train.py grouped",
                                           "train.py grouped bf16 base"], result.stderr
    reference = rows[0]["trainable"]
    for row in rows:
        assert abs(row["trainable"] - reference) <= 0.01 * reference  # the same biases; heads of one size
        (epoch,) = row["epochs"]
        assert epoch["updates"] == 5 and epoch["seconds"] > 0 and set(epoch["dev"]) == {"pearson", "spearman"}
    assert rows[0]["ratio_to_transformers"] is None and rows[1]["ratio_to_transformers"] > 0
    assert rows[1]["ratio_to_transformers_grouped"] is None and rows[3]["ratio_to_transformers_grouped"] > 0
    assert "| bitfit-all | train.py grouped |" in (tmp_path / "out" / "speed_vs_hf.md").read_text()


def test_quality_at_the_runner_s_defaults_on_its_training_sample(tmp_path, capsys):
    """--recipe defaults --train-subset: the plain transformers loop and train.py train the GLUE runner's default
    recipe for full fine-tuning on the runner's seeded sample, every epoch, and the best epoch is reported as
    the runner picks it; the flag recipe's options are refused beside it in one line."""
    from fairseq_ext.core.glue_tasks import TASKS
    from fairseq_ext.experiments import speed_vs_hf
    from fairseq_ext.training.glue_recipe import default_recipe

    glue = make_glue_dir(tmp_path / "glue", ("STS-B",), rows_per_split=40)
    common = ["--glue-dir", str(glue), "--task", "STS-B", "--modes", "full", "--recipe", "defaults"]
    tiny.assert_one_line_error(tiny.run_main(speed_vs_hf.main, capsys, *common, "--epochs", "2"),
                               "--epochs: not with --recipe defaults")
    result = tiny.run(["-m", "fairseq_ext.experiments.speed_vs_hf", *common, "--train-subset", "24", "--seed", "2",
                       "--systems", "transformers", "train.py grouped", "--output-dir", str(tmp_path / "out")])
    rows = json.loads((tmp_path / "out" / "speed_vs_hf.json").read_text())
    recipe = default_recipe("full", "STS-B", 24, 22_713_984)
    for system in ("transformers", "train.py grouped"):  # each system's epochs, then how far it got
        assert f"STS-B full {system}: {recipe.epochs} epochs ..." in result.stderr
        assert f"  STS-B full {system}: {recipe.epochs}/{recipe.epochs} updates (100%)" in result.stderr
    primary = TASKS["STS-B"].primary_metric
    assert [r["system"] for r in rows] == ["transformers", "train.py grouped"]
    for row in rows:
        assert (row["lr"], row["batch"], row["weight_decay"], row["train_rows"], row["seed"]) == \
            (recipe.lrs[0], recipe.batch, recipe.weight_decay, 24, 2)
        assert [e["updates"] for e in row["epochs"]] == [1] * recipe.epochs  # 24 rows: one batch an epoch
        assert row["ratio_to_transformers_grouped"] is None  # no peer trained
        best = max(row["epochs"], key=lambda e: (e["dev"][primary], -e["epoch"]))
        assert row["best_dev"] == {"epoch": best["epoch"], "metric": primary, "score": best["dev"][primary]}
    assert "| full | transformers |" in (tmp_path / "out" / "speed_vs_hf.md").read_text()
    assert f"STS-B full: lr {recipe.lrs[0]:g}, batch {recipe.batch}, {recipe.epochs} epochs, weight decay " \
           f"{recipe.weight_decay:g}, seed 2," in result.stderr


def test_the_transformers_loop_s_seed_is_its_own(tmp_path):
    """--seed reaches the transformers loop: the same seed trains the same numbers, another seed others
    (the head's initialisation and the batch order)."""
    from fairseq_ext.core.glue_tasks import TASKS
    from fairseq_ext.experiments.speed_vs_hf import time_transformers
    from fairseq_ext.training.glue_recipe import Recipe

    glue = make_glue_dir(tmp_path / "glue", ("STS-B",), rows_per_split=24, train_rows=48)
    recipe = Recipe((1e-3,), 8, 1, 0.0, None, "test")

    def dev(seed):
        (epoch,), _ = time_transformers(TASKS["STS-B"], glue, package_model_folder(), "bitfit-all", recipe, False,
                                        seed=seed)
        return epoch["dev"]
    first = dev(1)
    assert dev(1) == first and dev(2) != first


def test_the_grouped_transformers_peer_draws_length_sorted_megabatches():
    """The peer's sampler is transformers' LengthGroupedSampler with megabatches of N batches: every example
    once per epoch, each megabatch longest first (one example swapped to put the longest batch first), and
    a new order each epoch."""
    pytest.importorskip("transformers")
    from fairseq_ext.training.hf_reference_loop import length_grouped_sampler

    lengths = [int(n) for n in torch.randint(5, 128, (1000,), generator=torch.Generator().manual_seed(0))]
    batch, megabatch_batches = 8, 5
    sampler = length_grouped_sampler(lengths, batch, megabatch_batches, torch.Generator().manual_seed(1))
    first, second = list(sampler), list(sampler)
    assert sorted(first) == list(range(1000)) and first != second
    size = batch * megabatch_batches
    for start in range(0, 1000, size):
        chunk = [lengths[i] for i in first[start:start + size]]
        # longest first; only the first place may hold the example swapped out for the longest one
        assert chunk[1:] == sorted(chunk[1:], reverse=True), chunk
    assert lengths[first[0]] == max(lengths)

    def padded(order):
        return sum(batch * max(lengths[i] for i in order[s:s + batch]) for s in range(0, 1000, batch))
    assert padded(first) < 0.8 * padded(list(torch.randperm(1000, generator=torch.Generator().manual_seed(2))))


def test_a_decoder_only_language_model_gets_its_row(tmp_path):
    """transformer_lm archs train on synthetic language modeling: full and BitFit rows with real
    numbers and ratios to full (no assertion on time)."""
    result = tiny.run(["-m", "fairseq_ext.experiments.benchmark", "--models", "transformer_lm_gpt2_tiny", "--modes",
                       "full", "bitfit-all", "--device", "cpu", "--batch", "2", "--seq-len", "16", "--steps", "2",
                       "--warmup", "1", "--output-dir", str(tmp_path)])
    full, bitfit = json.loads((tmp_path / "benchmark.json").read_text())
    assert (full["mode"], bitfit["mode"]) == ("full", "bitfit-all")
    assert full["trainable"] == full["total"] == bitfit["total"] > bitfit["trainable"] > 0
    for row in (full, bitfit):
        assert 0 < row["step_ms_median"] <= row["update_ms_median"] and row["peak_mem_bytes"] > 0
    assert bitfit["ratio_to_full"] > 0 and bitfit["mem_ratio_to_full"] > 0 and full["ratio_to_full"] == 1.0
    assert "| transformer_lm_gpt2_tiny | bitfit-all |" in (tmp_path / "benchmark.md").read_text(), result.stdout


def test_compile_cost_pairs_the_updates_and_finds_the_break_even():
    """The same batches in order: per-update savings, their net, and when the steady saving pays the deficit back."""
    from fairseq_ext.experiments.compile_cost import compare

    eager = [0.5] * 10
    compiled = [20.5, 0.6] + [0.4] * 8  # 20 s to compile, one recompile-ish update, then 0.1 s saved each
    row = compare(eager, compiled, run_updates=1000)
    assert row["net_s"] == round(-20.0 - 0.1 + 0.8, 1) and row["steady_saving_ms"] == 100.0
    assert row["break_even_updates"] == 10 + 193 and row["pays"]  # 19.3 s more at 0.1 s an update
    assert not compare(eager, compiled, run_updates=200)["pays"]
    slower = compare(eager, [20.5] + [0.6] * 9, run_updates=10**6)
    assert slower["break_even_updates"] is None and not slower["pays"]
    assert compare(eager, [0.4] * 10, run_updates=10)["break_even_updates"] == 1


@pytest.mark.skipif(not tiny.REAL_GLUE.is_dir(), reason="no real GLUE files")
def test_compile_cost_trains_eagerly_and_compiled_on_the_same_batches(tmp_path):
    """The embedded MiniLM compiled in place inside train.py (dynamo with the eager backend: no C++ compiler
    needed) trains the same number of updates as the eager run, and the report has the paired row."""
    glue = tmp_path / "glue" / "STS-B"
    glue.mkdir(parents=True)
    for split in ("train", "dev", "test"):
        lines = (tiny.REAL_GLUE / "STS-B" / f"{split}.tsv").read_text().split("\n")[:81]
        (glue / f"{split}.tsv").write_text("\n".join(lines) + "\n")
    result = tiny.run(["-m", "fairseq_ext.experiments.compile_cost", "--glue-dir", str(glue.parent), "--task",
                       "STS-B", "--modes", "bitfit-all", "--updates", "4", "--backend", "eager",
                       "--output-dir", str(tmp_path / "out")])
    (row,) = json.loads((tmp_path / "out" / "compile_cost.json").read_text())
    assert len(row["eager_s"]) == len(row["compiled_s"]) == row["updates"] == 4, result.stderr
    assert row["run_updates"] == 20 * 3  # the runner's BitFit recipe on 80 rows: 20 epochs of 3 batches of 32
    assert "| STS-B | bitfit-all | eager |" in (tmp_path / "out" / "compile_cost.md").read_text()


def test_parallel_throughput_counts_only_while_every_run_trains():
    from fairseq_ext.core.errors import UserError
    from fairseq_ext.experiments.parallel_throughput import machine_rate
    from fairseq_ext.training.timed_updates import UpdateTime

    def timeline(ends):
        return [UpdateTime(end - 0.5, end) for end in ends]

    fast, slow = timeline([1, 2, 3, 4, 5, 6]), timeline([1.5, 3, 4.5, 6, 7.5])
    # From 1.5 s (both past one warm-up update) to 6 s (the fast run's last): 5 and 3 updates in 4.5 s.
    total, each = machine_rate([fast, slow], warmup=1)
    assert each == [5 / 4.5, 3 / 4.5] and total == pytest.approx(8 / 4.5)
    assert machine_rate([fast], warmup=2)[0] == 4 / 4  # one run: updates 3 to 6, from 2 s to 6 s
    with pytest.raises(UserError, match="did not train side by side"):
        machine_rate([timeline([1, 2]), timeline([3, 4])], warmup=1)
    with pytest.raises(UserError, match="a run trained no update while all trained"):
        machine_rate([fast, timeline([5.5, 5.9, 20])], warmup=2)  # 5.9 s to 6 s: only the fast run's last


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="side by side needs 2 cores")
def test_parallel_throughput_times_one_run_and_runs_side_by_side(tmp_path):
    """Train.py processes on synthetic STS-B with the embedded MiniLM: one 2-thread run, then two 1-thread
    runs at once; every rate is positive and the ratio is theirs."""
    from synthetic_glue import make_glue_dir

    glue = make_glue_dir(tmp_path / "glue", ("STS-B",), rows_per_split=24, train_rows=200)
    tiny.run(["-m", "fairseq_ext.experiments.parallel_throughput", "--glue-dir", str(glue), "--task", "STS-B",
              "--modes", "bitfit-all", "--runs", "2", "--rounds", "1", "--updates", "6", "--warmup", "2",
              "--output-dir", str(tmp_path / "out")])
    measured = json.loads((tmp_path / "out" / "parallel_throughput.json").read_text())
    (row,) = measured["rows"]
    cores = len(os.sched_getaffinity(0))
    assert (row["threads"], row["runs"], row["threads_each"]) == (cores, 2, cores // 2)
    assert row["one_run"] > 0 and len(row["side_by_side_each"]) == 2 and all(r > 0 for r in row["side_by_side_each"])
    assert abs(row["side_by_side"] - sum(row["side_by_side_each"])) < 1e-3
    assert abs(row["ratio"] - row["side_by_side"] / row["one_run"]) < 1e-3
    assert measured["summary"] == [{"mode": "bitfit-all", "ratio": row["ratio"]}]
