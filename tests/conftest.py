import logging
import os
import shutil
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: train.py, fairseq_ext
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny.py

import tiny  # noqa: E402

# The GLUE jobs the tests start train in fp32 on every machine alike; BF16_BASE's own tests set it.
os.environ.setdefault("BF16_BASE", "off")


# The files whose tests take longest, slowest first, as measured (pytest --durations, 2 workers,
# 2026-12-08; seconds summed per file). pytest-xdist's loadfile hands out whole files in
# collection order, so these go first and the many short files even out the two workers at the
# end, instead of a long file starting last (pytest.ini turns off xdist's own order, by test count).
SLOWEST_FILES = ("test_glue_run.py", "test_benchmark.py", "test_glue_parallel.py", "test_train.py",
                 "test_hydra.py", "test_defaults_search.py", "test_task_families.py", "test_tuners.py",
                 "test_export_hf.py", "test_seq2seq.py", "test_distributed.py", "test_inference_cost.py",
                 "test_glue_bf16_base.py", "test_lm.py", "test_patches.py", "test_gpu_check.py")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOWEST_FILES)))  # stable: a file keeps its order


@pytest.fixture(autouse=True)
def root_logger_as_it_was():
    """A CLI's main() sets up the root logger for its process (logging.basicConfig(force=True) on the
    stderr of that moment). Run in-process, that stderr is a test's capture, closed after the test: the
    handler is taken off again, so a later test's log records do not land on a closed stream."""
    root = logging.getLogger()
    before, level = list(root.handlers), root.level
    yield
    for handler in list(root.handlers):
        if type(handler) is logging.StreamHandler and handler not in before:  # basicConfig's; not pytest's own
            root.removeHandler(handler)
    root.setLevel(level)


def built_once(tmp_path_factory, name, build):
    """What ``build(folder)`` returns, built by one pytest-xdist worker of this session while the others
    wait, then read by all: the tiny base and runs take about 30 s of training, once, not once a worker."""
    if "PYTEST_XDIST_WORKER" not in os.environ:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock  # torch's own dependency

    folder = tmp_path_factory.getbasetemp().parent / name  # the session's folder, above each worker's
    built = folder.with_name(f"{name}.built")  # holds the returned path, relative to the folder
    with FileLock(f"{folder}.lock"):
        if not built.exists():
            shutil.rmtree(folder, ignore_errors=True)
            folder.mkdir()
            built.write_text(str(build(folder).relative_to(folder)))
    return folder / built.read_text()


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Binarized synthetic sentence-classification data, with a masked-LM copy."""
    return built_once(tmp_path_factory, "tiny_data", tiny.make_classification_data)


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_data, tmp_path_factory):
    """A tiny RoBERTa pretrained with the masked-LM objective by train.py."""
    return built_once(tmp_path_factory, "tiny_pretrained", lambda folder: tiny.pretrain_masked_lm(tiny_data, folder))


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tiny_pretrained, tmp_path_factory):
    """Two BitFit tasks on the tiny base: OFA's biases, and every bias (q/k/v too) with another seed."""
    def train(root):
        for name, extra in (("ofa", ["--bitfit"]), ("all", ["--bitfit", "--bitfit-terms", "all", "--seed", "2"])):
            tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, root / name, extra=extra))
        return root
    return built_once(tmp_path_factory, "tiny_runs", train)
