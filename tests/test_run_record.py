"""train.py's run record (core/run_record.py) and how the GLUE runner reads it, without training."""
import json

import numpy as np
import pytest
import torch

from fairseq_ext.core.errors import UserError
from fairseq_ext.core.glue_tasks import get_task_spec
from fairseq_ext.core.run_record import RECORD_NAME, RunRecord, epoch_stats, read_run_record
from fairseq_ext.experiments.glue_run import run_summary
from fairseq_ext.experiments.glue_run.console import RecordEcho


def strict_json(path):
    def refuse(constant):
        raise ValueError(f"not strict JSON: {constant}")
    return json.loads(path.read_text(), parse_constant=refuse)


def test_a_record_grows_over_launches_and_stays_strict_json(tmp_path):
    record = RunRecord.open(tmp_path)
    record.set_parameters(10, 100, {"terms": "ofa", "train_heads": True, "unused": [], "groups": {}})
    record.add_stats("valid", 1, {"loss": np.float32(0.5), "mcc": torch.tensor(12.5), "num_updates": np.int64(4),
                                  "best_loss": float("inf"), "note": object()})
    record.end("failed", "--bitfit-terms: bad", checkpoints={})
    again = RunRecord.open(tmp_path, resumed_from=str(tmp_path / "checkpoint_last.pt"))
    again.add_stats("valid", 1, {"loss": 0.25})  # the epoch validated again after the restart
    again.add_stats("train", 1, {"loss": 0.3})
    again.end("finished", checkpoints={"checkpoint_last.pt": str(tmp_path / "checkpoint_last.pt")})

    data = strict_json(tmp_path / RECORD_NAME)
    assert data == read_run_record(tmp_path / RECORD_NAME)
    assert data["status"] == "finished" and data["parameters"] == {"trainable": 10, "total": 100}
    assert [(launch["status"], launch["error"], launch["resumed_from"]) for launch in data["launches"]] == [
        ("failed", "--bitfit-terms: bad", None), ("finished", None, str(tmp_path / "checkpoint_last.pt"))]
    first = data["stats"][0]["values"]
    assert first["loss"] == 0.5 and first["mcc"] == 12.5 and first["num_updates"] == 4
    assert first["best_loss"] is None and isinstance(first["note"], str)
    assert epoch_stats(data, "valid") == {1: {"loss": 0.25}}  # the later entry counts
    assert epoch_stats(data, "train") == {1: {"loss": 0.3}}


def test_what_is_not_a_record_is_refused(tmp_path):
    with pytest.raises(UserError, match="no such run record"):
        read_run_record(tmp_path / RECORD_NAME)
    (tmp_path / RECORD_NAME).write_text('{"format": "something else"}')
    with pytest.raises(UserError, match="not a run record of train.py"):
        read_run_record(tmp_path / RECORD_NAME)


def test_the_runner_reads_metrics_per_epoch_and_subset(tmp_path):
    record = RunRecord.open(tmp_path)
    record.set_parameters(7, 70, None)
    for epoch in (1, 2):
        record.add_stats("train", epoch, {"loss": 1.0 / epoch, "num_updates": 10 * epoch})
        record.add_stats("valid", epoch, {"loss": 0.9, "accuracy": 60.0 + epoch, "glue_score": 60.0 + epoch,
                                          "num_updates": 10 * epoch})
        record.add_stats("valid1", epoch, {"accuracy": 50.0 + epoch, "glue_score": 50.0 + epoch})
    summary = run_summary(read_run_record(tmp_path / RECORD_NAME), get_task_spec("MNLI"))
    assert summary["trainable"] == 7 and summary["total"] == 70 and summary["updates"] == 20
    assert summary["epochs"][2] == {"accuracy": 62.0, "glue_score": 62.0, "accuracy_mm": 52.0,
                                    "glue_score_mm": 52.0}


def test_the_runner_echoes_what_a_launch_adds(tmp_path):
    earlier = RunRecord.open(tmp_path)
    earlier.set_parameters(5, 50, None)
    earlier.add_stats("valid", 1, {"loss": 0.7, "wps": 1000.0})
    earlier.end("interrupted", checkpoints={})
    echo = RecordEcho(tmp_path / RECORD_NAME)  # what the earlier launch left is not repeated
    assert echo.poll() == []
    resumed = RunRecord.open(tmp_path, resumed_from="runs/x/checkpoint_last.pt")
    resumed.set_parameters(5, 50, None)
    resumed.add_stats("train", 2, {"loss": 0.6})
    resumed.add_stats("valid", 2, {"loss": 0.5, "mcc": 20.0, "wps": 900.0, "nll_loss": 0.1})
    assert echo.poll() == ["resuming the interrupted run from runs/x/checkpoint_last.pt",
                           "trainable params: 5 || all params: 50 || trainable%: 10.0000",
                           "epoch 2 valid: loss 0.5, mcc 20.0"]
    assert echo.poll() == []
    resumed.add_stats("valid", 3, {"loss": 0.4})  # a rewrite within the same clock tick is still seen
    assert echo.poll() == ["epoch 3 valid: loss 0.4"]
