"""The GLUE job's own file in a run folder, ``run.json``, beside train.py's ``run_record.json``.

It holds what the job knows of the run that train.py does not: the settings the run is trained
with (train.py's arguments and the prepared data's key), the wall seconds over all its launches,
and, once it finished, its results row::

    {"format": "glue-run", "settings": {...}, "seconds": 812.4, "result": null or {...}}

Run folders written before it (``settings.json``, ``elapsed.json``, ``result.json``) are read as
they are, and the first write migrates them into ``run.json``.
"""
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from ...core.errors import UserError
from ...core.files import write_text_atomically

logger = logging.getLogger("fairseq_ext.experiments.glue_run")

RUN_FILE = "run.json"
FORMAT = "glue-run"
# The three files of a run folder before run.json, by field.
EARLIER_FILES = {"settings": "settings.json", "seconds": "elapsed.json", "result": "result.json"}


@dataclass
class RunFile:
    """A run folder's run.json: its settings, wall seconds over all launches, and results row."""

    settings: Optional[dict] = None
    seconds: float = 0.0
    result: Optional[dict] = None

    @classmethod
    def read(cls, run_dir: Path) -> "RunFile":
        path = Path(run_dir) / RUN_FILE
        if path.exists():
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except ValueError as error:
                raise UserError(f"{path}: not the GLUE job's run file ({error}); delete the run folder to train "
                                "it again") from None
            return cls(data.get("settings"), float(data.get("seconds") or 0.0), data.get("result"))
        earlier = {field: Path(run_dir) / name for field, name in EARLIER_FILES.items()}
        elapsed = json.loads(earlier["seconds"].read_text())["seconds"] if earlier["seconds"].exists() else 0.0
        return cls(json.loads(earlier["settings"].read_text()) if earlier["settings"].exists() else None,
                   float(elapsed),
                   json.loads(earlier["result"].read_text()) if earlier["result"].exists() else None)

    def write(self, run_dir: Path) -> None:
        """Write run.json whole; the files it replaces go once it is written."""
        run_dir = Path(run_dir)
        write_text_atomically(run_dir / RUN_FILE, json.dumps({"format": FORMAT, **asdict(self)}, indent=1) + "\n")
        earlier = [run_dir / name for name in EARLIER_FILES.values() if (run_dir / name).exists()]
        if earlier:
            logger.info(f"{run_dir}: {', '.join(path.name for path in earlier)} migrated into {RUN_FILE}")
            for path in earlier:
                path.unlink()


def finished_result(run_dir: Path) -> Optional[dict]:
    """The results row of a run that finished, or None."""
    if not Path(run_dir).is_dir():
        return None
    return RunFile.read(run_dir).result
