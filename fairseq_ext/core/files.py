"""Write a file so that it is either the old one or the whole new one, never half of it."""
import hashlib
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from .errors import UserError


def write_atomically(path, write) -> None:
    """``write(tmp)`` next to ``path``, then rename: ``path`` is either the old file or the whole new one."""
    path = str(path)
    tmp = os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # as a plain open() would create it (some writers make it private)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(path) -> str:
    """The hex sha256 of a file's bytes, read a block at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomically(path, text: str) -> None:
    write_atomically(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_report(folder, stem: str, data, markdown: str) -> str:
    """STEM.json (``data``) and STEM.md (``markdown``) in ``folder``, made if needed; a line naming them."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    write_text_atomically(folder / f"{stem}.json", json.dumps(data, indent=1) + "\n")
    write_text_atomically(folder / f"{stem}.md", markdown)
    return f"written: {folder / f'{stem}.json'}, {folder / f'{stem}.md'}"


def check_output_file(path, flag: str) -> None:
    """A file ``flag`` names to write: its folder must exist, and it must not be a folder itself."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{flag} {path}: is a folder; name the file to write")
    if not path.parent.is_dir():
        raise UserError(f"{flag} {path}: no such folder {path.parent}")


def require_file(folder: Path, name: str, why: str) -> Path:
    """``folder/name``, which must be a file (``why``: what it is, for the one-line error)."""
    path = Path(folder) / name
    if not path.is_file():
        raise UserError(f"{folder}: missing {name} ({why})")
    return path


def write_folder_atomically(out: Path, fill):
    """``fill(staging)`` in a hidden folder beside ``out``, then renamed to ``out`` (absent or empty):
    ``out`` is either missing or whole, and a failure leaves nothing behind.  Returns what ``fill`` returns."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        filled = fill(staging)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private
        if out.exists():
            out.rmdir()  # the caller checked it is empty
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return filled
