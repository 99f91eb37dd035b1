"""train.py's record of a run, for programs to read: ``SAVE_DIR/run_record.json``.

What trained, what every epoch and validation gave, and which checkpoints the run
left, as one JSON object (``RECORD_NAME`` in the save dir)::

    {"format": "fairseq-bitfit-run-record", "format_version": 1,
     "status": "running" | "finished" | "failed" | "interrupted",
     "launches": [{"started": ISO time, "ended": ISO time or null, "resumed_from": path or null,
                   "status": ..., "error": the one-line error or null}],
     "parameters": {"trainable": N, "total": M},
     "bitfit": null, or {"terms": "ofa", "train_heads": true, "unused": [names],
                         "groups": {"ln1": {"tensors": 2, "params": 64}, ..., "head": {...}}},
     "stats": [{"tag": "train" or a valid subset, "epoch": 1, "values": {"loss": 0.69, ...}}, ...],
     "checkpoints": {"checkpoint_best.pt": path, "checkpoint_best.delta.safetensors": path, ...},
     "early_stop": null, or {"epoch": E, "updates": N, "metric": "loss", "best": its best value,
                             "patience": P}: --patience ended the run after epoch E's validation,
     "progress": null, or {"updates": N, "total_updates": planned or null, "epoch": E, "max_epoch": M or null,
                  "epoch_updates": n, "epoch_total": updates per epoch, "loss": the epoch's running mean,
                  "updates_per_s": recent speed, "last_saved_updates": updates in the newest checkpoint or null,
                  "time": ISO time}}

``progress`` is refreshed every few seconds while the run trains, for a driver to
show live; the planned total is an upper bound when early stopping (--patience) is on.
A new launch starts it over, keeping only ``last_saved_updates`` until it saves.

``stats`` holds what fairseq prints at each epoch's end (tag ``train``) and at each
validation (tag = the subset), in order; a resumed run appends to the record of its
earlier launches, so an epoch validated twice (before and after a restart) appears
twice and the later entry counts (``epoch_stats``).  Only the run's first worker
writes it, atomically at every change: a reader never sees half a file.
"""
import datetime
import json
import math
import numbers
from pathlib import Path
from typing import Dict, Mapping, Optional

from .errors import UserError
from .files import write_text_atomically

RECORD_NAME = "run_record.json"
FORMAT = "fairseq-bitfit-run-record"
FORMAT_VERSION = 1


def _now() -> str:
    return datetime.datetime.now().astimezone().isoformat(timespec="seconds")


def _plain(value):
    """A stats value as JSON: numbers (numpy and torch scalars included) as numbers, NaN and
    infinities as null, the rest as text."""
    if isinstance(value, bool) or value is None:
        return value
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value) if math.isfinite(value) else None  # strict JSON has no NaN or infinity
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return _plain(value.item())
    return str(value)


class RunRecord:
    """The record of one save dir, kept in memory and written whole at every change."""

    def __init__(self, path, data: dict):
        self.path = Path(path)
        self.data = data

    @classmethod
    def open(cls, save_dir, resumed_from: Optional[str] = None) -> "RunRecord":
        """The save dir's record with a new launch started: continued if a launch before left one."""
        path = Path(save_dir) / RECORD_NAME
        data = read_run_record(path) if path.exists() else {
            "format": FORMAT, "format_version": FORMAT_VERSION, "status": "running", "launches": [],
            "parameters": None, "bitfit": None, "stats": [], "checkpoints": {}, "progress": None}
        data["status"] = "running"
        # A new launch has no progress yet; what the last one saved is still what a restart resumes from.
        data["progress"] = {"last_saved_updates": (data.get("progress") or {}).get("last_saved_updates")}
        data["launches"].append({"started": _now(), "ended": None, "resumed_from": resumed_from,
                                 "status": "running", "error": None})
        record = cls(path, data)
        record.save()
        return record

    def save(self) -> None:
        write_text_atomically(self.path, json.dumps(self.data, indent=1, allow_nan=False) + "\n")

    def set_parameters(self, trainable: int, total: int, bitfit: Optional[dict]) -> None:
        self.data["parameters"] = {"trainable": int(trainable), "total": int(total)}
        self.data["bitfit"] = bitfit
        self.save()

    def add_stats(self, tag: str, epoch: Optional[int], values: Mapping[str, object]) -> None:
        self.data["stats"].append({"tag": tag, "epoch": epoch,
                                   "values": {key: _plain(value) for key, value in values.items()}})
        self.save()

    def set_progress(self, progress: Mapping[str, object]) -> None:
        self.data["progress"] = {**{key: _plain(value) for key, value in progress.items()}, "time": _now()}
        self.save()

    def set_early_stop(self, stop: Optional[Mapping[str, object]]) -> None:
        """--patience ended the run (``stop``: its epoch, updates, metric, best value and patience), or None."""
        self.data["early_stop"] = None if stop is None else {key: _plain(value) for key, value in stop.items()}
        self.save()

    def end(self, status: str, error: Optional[str] = None, *, checkpoints: Dict[str, str],
            peak_memory_bytes: Optional[int] = None) -> None:
        """The launch ended: ``finished``, ``interrupted``, or ``failed`` with its one-line error; with the
        process's peak memory (CUDA's on a GPU, the resident set's on CPU)."""
        launch = self.data["launches"][-1]
        launch.update(ended=_now(), status=status, error=error)
        if peak_memory_bytes is not None:
            launch["peak_memory_bytes"] = int(peak_memory_bytes)
        self.data["status"] = status
        self.data["checkpoints"] = dict(checkpoints)
        self.save()


def read_run_record(path) -> dict:
    """A run record, checked to be one; UserError otherwise."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such run record (train.py writes it in its --save-dir)") from None
    except ValueError as error:
        raise UserError(f"{path}: not a run record ({error})") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise UserError(f"{path}: not a run record of train.py")
    if data.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{path}: run record version {data.get('format_version')!r}; this fairseq_ext reads "
                        f"version {FORMAT_VERSION}")
    return data


def epoch_stats(record: dict, tag: str) -> Dict[int, dict]:
    """{epoch: values} of one tag; of an epoch recorded more than once, the last entry."""
    return {entry["epoch"]: entry["values"] for entry in record["stats"]
            if entry["tag"] == tag and entry["epoch"] is not None}
