"""Print the folder of the embedded default model (all-MiniLM-L6-v2), converting it on first use.

    python -m fairseq_ext.tools.pretrained [--cache-dir DIR]

stdout carries only the path, so run scripts can capture it; logs and errors go to stderr.
"""
import argparse

from ..core.errors import exit_on_user_error, quiet_cli_logging
from ..plugin.models.pretrained import default_model_dir


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.pretrained",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache-dir", help="cache folder (default: $FAIRSEQ_EXT_CACHE, "
                                            "$XDG_CACHE_HOME/fairseq_ext or ~/.cache/fairseq_ext)")
    args = parser.parse_args(argv)
    quiet_cli_logging()
    print(default_model_dir(args.cache_dir))


if __name__ == "__main__":
    main()
