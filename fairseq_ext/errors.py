"""User-facing errors: one line, exit status 2, no traceback.

Raise ``UserError`` for bad input (a flag, a file, a line in a file); every
command-line entry point catches it through ``exit_on_user_error``.
"""
import functools
import logging
import os
import sys


class UserError(Exception):
    """Bad input that the user can fix; the message names the flag, file or line."""


def exit_on_user_error(main):
    """Decorate a CLI ``main`` so a UserError prints one line and exits with status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            return main(*args, **kwargs)
        except UserError as error:
            prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "fairseq_ext"
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
            sys.exit(2)

    return wrapper


def quiet_cli_logging() -> None:
    """Warnings and errors only, on stderr: a CLI's output stays its result."""
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.WARNING,
                        stream=sys.stderr, force=True)
