import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: train.py, fairseq_ext
sys.path.insert(0, str(Path(__file__).resolve().parent))  # tests/tiny.py

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """Binarized synthetic sentence-classification data, with a masked-LM copy."""
    return tiny.make_classification_data(tmp_path_factory.mktemp("tiny_data"))


@pytest.fixture(scope="session")
def tiny_pretrained(tiny_data, tmp_path_factory):
    """A tiny RoBERTa pretrained with the masked-LM objective by train.py."""
    return tiny.pretrain_masked_lm(tiny_data, tmp_path_factory.mktemp("tiny_pretrained"))
