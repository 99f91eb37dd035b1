"""How torch's CPU threads wait for work (set before torch loads), and how many cores there are.

torch's CPU wheels run their threads on GNU OpenMP (libgomp), which keeps a thread that has
finished its share of an operation spinning for a while before it sleeps.  Where other processes
share the cores (a shared machine, or ``PARALLEL`` runs beside each other), the spinning thread
holds a core that its partner thread needs, and a 2-thread run slowed to 0.4x of a 1-thread one
(docs/benchmarks.md, "CPU threads on a shared machine").  Sleeping threads avoid that.

libgomp reads ``OMP_WAIT_POLICY`` once, when torch is first imported, so ``fairseq_ext`` applies
this before anything imports torch (and train.py, the runner and the tools import it first); a
value the user set is kept.  Child processes (train.py runs the GLUE runner starts) inherit it.
"""
import os

WAIT_POLICY = "PASSIVE"


def prefer_sleeping_threads() -> None:
    os.environ.setdefault("OMP_WAIT_POLICY", WAIT_POLICY)


def available_cores() -> int:
    """The cores this process may run on (its affinity, where the OS tells it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
