"""Experiment drivers, side by side: the GLUE runner, the benchmark, the GPU check, delta measurements."""
