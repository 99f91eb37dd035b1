"""User-facing errors: one line, exit status 2, no traceback.

Raise ``UserError`` for bad input (a flag, a file, a line in a file); every
command-line entry point catches it through ``exit_on_user_error``, which prints
``PROG: error: MESSAGE`` (argparse's own format) on stderr.  A process that runs
such a command learns the error as data: it names a file in ``ERROR_FILE_VARIABLE``,
where the message is written, and reads it with ``read_error_file``.
"""
import functools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Optional


class UserError(Exception):
    """Bad input that the user can fix; the message names the flag, file or line."""


def error_line(prog: str, message: str) -> str:
    return f"{prog}: error: {message}"


# A program that runs a command of this package sets this to a file path; the command writes its
# one-line error there as JSON ({"prog": ..., "error": ...}) besides printing it.
ERROR_FILE_VARIABLE = "FAIRSEQ_EXT_ERROR_FILE"


def read_error_file(path) -> Optional[str]:
    """The one-line error a command wrote to ``path`` (see ERROR_FILE_VARIABLE), or None."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))["error"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def program_name() -> str:
    """What argparse calls this program: the script's file name."""
    return os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq_ext"


def exit_on_user_error(main=None, *, prog: Optional[str] = None):
    """Decorate a CLI ``main`` so a UserError prints one line and exits with status 2.

    ``prog`` names the program in that line (default: ``program_name()``); use it as
    ``@exit_on_user_error`` or ``@exit_on_user_error(prog="train.py")``.
    """
    if main is None:
        return functools.partial(exit_on_user_error, prog=prog)

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            print(error_line(prog or program_name(), str(error)), file=sys.stderr, flush=True)
            if os.environ.get(ERROR_FILE_VARIABLE):
                from .files import write_text_atomically  # files imports this module

                write_text_atomically(os.environ[ERROR_FILE_VARIABLE],
                                      json.dumps({"prog": prog or program_name(), "error": str(error)}) + "\n")
            sys.exit(2)

    return wrapper


def quiet_cli_logging() -> None:
    """Warnings and errors only, on stderr: a CLI's output stays its result."""
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.WARNING,
                        stream=sys.stderr, force=True)


def one_line(error: BaseException) -> str:
    """The first line of an exception's message (its type name if it has none)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]
