"""The benchmark runs and writes valid results (a tiny model; no assertion on time)."""
import json
import os
import subprocess

import tiny


def test_benchmark_writes_json_and_markdown(tmp_path):
    env = dict(os.environ, MODELS="bert_tiny", MODES="full bitfit-ofa head", STEPS="2", WARMUP="1",
               BATCH="4", SEQ_LEN="16", DEVICE="cpu", OUTPUT_DIR=str(tmp_path), OMP_NUM_THREADS="1")
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


def test_rounds_combine_into_medians_and_paired_ratios():
    from fairseq_ext.benchmark import add_ratios, combine_rounds

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
