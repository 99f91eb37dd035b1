"""The inference-cost benchmark: every variant timed side by side, merging checked to change nothing."""
import json

import tiny
from fairseq_ext.experiments.inference_cost import VARIANTS


def test_inference_cost_times_every_variant_and_merges_exactly(tmp_path):
    result = tiny.run(["-m", "fairseq_ext.experiments.inference_cost", "--rounds", "1", "--tasks", "2",
                       "--length", "16", "--output-dir", str(tmp_path)], timeout=900)
    measured = json.loads((tmp_path / "inference_cost.json").read_text())
    for kind in ("latency", "throughput"):
        forward = measured["forward"][kind]
        assert set(forward["ms_median"]) == set(VARIANTS) and all(ms > 0 for ms in forward["ms_median"].values())
        assert forward["over_base"]["base"] == 1.0
    assert all(difference < 1e-4 for difference in measured["merged_vs_unmerged_max_abs"].values())
    serving = measured["serving"]
    assert set(serving["mixed_over_one_task"]) == {"bitfit", "lora"} and serving["tasks"] == 2
    report = (tmp_path / "inference_cost.md").read_text()
    assert all(f"| {variant} |" in report for variant in VARIANTS)
    assert "| adapter |" in report and "| lora |" in report and "| adapter |" in result.stdout
