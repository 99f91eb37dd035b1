"""The base checkpoint a run trained from, as its settings record it: by the sha256 of its bytes, not its path,
so that a ledger (results.json) stays reusable on a machine whose model folder lives elsewhere."""
from pathlib import Path
from typing import Dict, List, Optional

from ...core.files import file_sha256

BASE = "BASE"  # the base checkpoint's place in recorded train.py arguments; settings["base"] says which it is
_digests: Dict[tuple, str] = {}


def base_digest(checkpoint) -> str:
    """``sha256:<hex>`` of a base checkpoint's bytes, read once per version of the file."""
    path = Path(checkpoint).resolve()
    stat = path.stat()
    key = (str(path), stat.st_size, stat.st_mtime_ns)
    if key not in _digests:
        _digests[key] = "sha256:" + file_sha256(path)
    return _digests[key]


def _restore_file_index(train_args: List[str]) -> Optional[int]:
    return train_args.index("--restore-file") + 1 if "--restore-file" in train_args[:-1] else None


def comparable_settings(recorded: dict) -> dict:
    """Settings recorded with the base checkpoint as a path (before the base was recorded by its digest), in
    today's form where that file is here to read; otherwise as recorded."""
    index = _restore_file_index(recorded["train_args"])
    if "base" in recorded or index is None or not Path(recorded["train_args"][index]).is_file():
        return recorded
    train_args = list(recorded["train_args"])
    path, train_args[index] = train_args[index], BASE
    return {**recorded, "train_args": train_args, "base": base_digest(path)}


def base_change(before: dict, settings: dict) -> Optional[str]:
    """How the base checkpoint of ``settings`` differs from the one ``before`` (comparable) was trained from."""
    if before.get("base") == settings.get("base"):
        return None
    index = _restore_file_index(before["train_args"])
    was = before.get("base") or (f"{before['train_args'][index]}, a file this machine lacks" if index else "none")
    return f"the base model (its checkpoint: {was}; now {settings.get('base')})"
