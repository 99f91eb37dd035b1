"""Command-line tools, each a small CLI over library functions: ``python -m fairseq_ext.tools.NAME``."""
