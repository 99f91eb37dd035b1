"""Data: the registered ``wordpiece`` BPE, and GLUE files prepared as fairseq data."""
