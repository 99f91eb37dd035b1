import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: train.py, fairseq_ext
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny.py

import tiny  # noqa: E402

# The GLUE jobs the tests start train in fp32 on every machine alike; BF16_BASE's own tests set it.
os.environ.setdefault("BF16_BASE", "off")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Binarized synthetic sentence-classification data, with a masked-LM copy."""
    return tiny.make_classification_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_data, tmp_path_factory):
    """A tiny RoBERTa pretrained with the masked-LM objective by train.py."""
    return tiny.pretrain_masked_lm(tiny_data, tmp_path_factory.mktemp("tiny_pretrained"))


@pytest.fixture(scope="session")
def tiny_runs(tiny_data, tiny_pretrained, tmp_path_factory):
    """Two BitFit tasks on the tiny base: OFA's biases, and every bias (q/k/v too) with another seed."""
    root = tmp_path_factory.mktemp("tiny_runs")
    for name, extra in (("ofa", ["--bitfit"]), ("all", ["--bitfit", "--bitfit-terms", "all", "--seed", "2"])):
        tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, root / name, extra=extra))
    return root
