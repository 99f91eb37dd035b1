"""python -m fairseq_ext.tools.serve"""
from . import main

main()
