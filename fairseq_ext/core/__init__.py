"""The framework-free core: torch, numpy, scipy and safetensors only, never fairseq.

BitFit's selection, freezing, report and trained-part save/load on any
``torch.nn.Module`` (``bitfit``), the delta file format (``delta_file``), the GLUE
task table, files and metrics (``glue_tasks``, ``glue_files``, ``glue_metrics``),
train.py's run record (``run_record``), errors and atomic file writes.
"""
