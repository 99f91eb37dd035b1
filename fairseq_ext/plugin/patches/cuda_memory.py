"""CUDA peak memory (the benchmark's, and each train.py run record's), through the resets fairseq makes after every update (see PATCHES:
cuda-peak-memory)."""
import torch

from . import _mark


class cuda_peak_memory:
    """The most CUDA memory allocated at any moment inside the block (``.peak``, bytes).

    fairseq's train_step reads and resets the CUDA peak after every update (its
    gb_free stat): each peak is recorded just before it is reset.  What an earlier
    run in the same process left allocated for good (cuBLAS's workspace) counts in
    every run alike, as it does in a fresh process once the first matmul has run.
    """

    def __enter__(self):
        self._peaks = []
        self._reset = torch.cuda.reset_peak_memory_stats
        self._reset()

        def record_then_reset(*args, **kwargs):
            self._peaks.append(torch.cuda.max_memory_allocated())
            self._reset(*args, **kwargs)

        torch.cuda.reset_peak_memory_stats = record_then_reset
        _mark("cuda-peak-memory")
        return self

    def current(self) -> int:
        """The peak so far (bytes)."""
        return max(self._peaks + [torch.cuda.max_memory_allocated()])

    def __exit__(self, *exc):
        self.peak = self.current()
        torch.cuda.reset_peak_memory_stats = self._reset
        _mark("cuda-peak-memory", False)
        return False
