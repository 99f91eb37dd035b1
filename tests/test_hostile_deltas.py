"""Crafted bad deltas: every reader (info, apply, predict, serve, analysis) refuses each in one line.

Each delta is the tiny ofa run's, with one thing wrong.  Most are saved with ``Delta.save``,
which writes a valid header checksum: what is wrong is the content, not the file's integrity,
so only the consistency checks can catch them.  The edited-header and old-delta cases write the
safetensors header by hand.
"""
import dataclasses
import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import tiny
from fairseq_ext.core import delta_file as deltas
from fairseq_ext.core.errors import UserError
from fairseq_ext.plugin.predictor import MultiTaskPredictor
from fairseq_ext.tools import analysis as analysis_cli
from fairseq_ext.tools import delta as delta_cli
from fairseq_ext.tools import predict as predict_cli
from fairseq_ext.tools import serve as serve_cli

BEST_DELTA = f"checkpoint_best{deltas.DELTA_SUFFIX}"
HEAD = "classification_heads.sentence_classification_head."


@pytest.fixture(scope="module")
def good(tiny_runs):
    return deltas.read_delta(tiny_runs / "ofa" / BEST_DELTA)


def with_tensors(delta, **changes):
    """The delta with tensors replaced (a value) or removed (None), keys with '__' for '.'."""
    tensors = dict(delta.tensors)
    for key, value in changes.items():
        name = key.replace("__", ".")
        if value is None:
            del tensors[name]
        else:
            tensors[name] = value
    return dataclasses.replace(delta, tensors=tensors)


def with_task(delta, label_symbols="unchanged", **cfg):
    task = {**delta.task, "cfg": {**delta.task_cfg, **cfg}}
    if label_symbols != "unchanged":
        task["label_symbols"] = label_symbols
    return dataclasses.replace(delta, task=task)


def a_bias(delta):
    return next(name for name in delta.tensors if name.endswith("fc1.bias"))


def bad_deltas(good):
    """{case: (the bad Delta, a fragment of the one-line refusal)}."""
    out_weight, out_bias = good.tensors[HEAD + "out_proj.weight"], good.tensors[HEAD + "out_proj.bias"]
    dense = good.tensors[HEAD + "dense.weight"]
    bias = a_bias(good)
    nan_bias = good.tensors[bias].clone()
    nan_bias[3] = float("nan")
    weight = bias[:-len("bias")] + "weight"
    return {
        "extra_head_tensor": (dataclasses.replace(good, tensors={**good.tensors, HEAD + "extra.weight": torch.ones(2)}),
                              "unexpected tensor " + HEAD + "extra.weight"),
        "misshaped_head": (dataclasses.replace(good, tensors={**good.tensors, HEAD + "dense.weight":
                                                              torch.cat([dense, dense[:, :1]], dim=1)}),
                           "reads 33 features"),
        "three_outputs_for_two_labels": (dataclasses.replace(good, tensors={
            **good.tensors, HEAD + "out_proj.weight": torch.cat([out_weight, out_weight[:1]]),
            HEAD + "out_proj.bias": torch.cat([out_bias, out_bias[:1]])}), "has 3 output(s)"),
        "nan_bias": (dataclasses.replace(good, tensors={**good.tensors, bias: nan_bias}), "non-finite"),
        "claims_sts_b": (with_task(good, glue_task="STS-B"), "GLUE STS-B, a regression task"),
        "claims_sts_b_regression": (with_task(good, glue_task="STS-B", regression_target=True, num_classes=1,
                                              label_symbols=None), "2 output(s)"),
        "three_label_names": (with_task(good, label_symbols=["0", "1", "2"]), "3 label symbols"),
        "unlisted_tensor": (dataclasses.replace(good, tensors={**good.tensors, weight: torch.zeros(64, 32)}),
                            f"holds tensor {weight}, which its selection"),
        "other_dtype": (dataclasses.replace(good, tensors={**good.tensors, bias: good.tensors[bias].double()}),
                        "is float64, but the header records training in float32"),
        "unknown_glue_task": (with_task(good, glue_task="IMDB"), "GLUE task 'IMDB'"),
    }


@pytest.fixture(scope="module")
def bad_files(good, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_deltas")
    files = {}
    for case, (delta, message) in bad_deltas(good).items():
        path = folder / f"{case}{deltas.DELTA_SUFFIX}"
        delta.save(path)
        files[case] = (path, message)
    # A header edited after it was written (STS-B claimed in place), its checksum left as it was.
    with safe_open(str(good.path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    task = json.loads(metadata["task"])
    task["cfg"]["glue_task"] = "STS-B"
    save_file(tensors, folder / f"edited{deltas.DELTA_SUFFIX}", metadata={**metadata, "task": json.dumps(task)})
    files["edited_header"] = (folder / f"edited{deltas.DELTA_SUFFIX}", "its header does not match the header checksum")
    # A bias shaped unlike the base's (the delta agrees with itself; the model does not).
    bias = a_bias(good)
    short = dataclasses.replace(good, tensors={**good.tensors, bias: good.tensors[bias][:-1].clone()})
    short.save(folder / f"short{deltas.DELTA_SUFFIX}")
    files["bias_shape_not_the_base_s"] = (folder / f"short{deltas.DELTA_SUFFIX}", f"{bias} is torch.float32 (63,)")
    return files


READ_AT_LOAD = {"edited_header", "extra_head_tensor", "misshaped_head", "three_outputs_for_two_labels", "nan_bias",
                "claims_sts_b", "claims_sts_b_regression", "three_label_names", "unlisted_tensor", "other_dtype",
                "unknown_glue_task"}


def test_every_reader_refuses_each_bad_delta_in_one_line(bad_files, tiny_pretrained, tiny_data, tmp_path, capsys):
    dictionary = tiny_data / "input0" / "dict.txt"
    sentences = tmp_path / "in.txt"
    sentences.write_text("good w1\nbad w2\n")
    out = tmp_path / "out.tsv"
    merged = tmp_path / "merged.pt"
    for case, (path, message) in bad_files.items():
        readers = {
            "apply": (delta_cli.main, "apply", "--base", tiny_pretrained, "--delta", path, "--out", merged),
            "predict": (predict_cli.main, "--base", tiny_pretrained, "--dictionary", dictionary,
                        "--delta", f"t={path}", "--task", "t", "--input", sentences, "--output", out),
            "serve": (serve_cli.main, "--base", tiny_pretrained, "--dictionary", dictionary, "--delta", f"t={path}",
                      "--port", "1"),  # refused before it binds any port
            "analysis": (analysis_cli.main, "bias-change", "--base", tiny_pretrained, "--delta", f"t={path}",
                         "--out", tmp_path / "figure"),
        }
        if case in READ_AT_LOAD:
            readers["info"] = (delta_cli.main, "info", path)
        for reader, (main, *argv) in readers.items():
            status, _, err = tiny.run_main(main, capsys, *argv)
            assert status == 2, (case, reader, err)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and str(path) in lines[0] and message in lines[0], (case, reader, err)
            assert "Traceback" not in err
        assert not merged.exists() and not out.exists() and not (tmp_path / "figure").exists(), case


def test_a_delta_made_in_memory_is_checked_too(good, tiny_pretrained, tiny_data):
    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt")
    for case, (delta, message) in bad_deltas(good).items():
        with pytest.raises(UserError, match="corrupt delta") as refused:
            predictor.add_task(case, delta)
        assert message in str(refused.value), case
    assert predictor.tasks == [] and predictor.model is None  # refused before the model was built
    predictor.add_task("ofa", good)
    assert predictor.predict("ofa", ["good w1"])[0].label in good.label_symbols


def test_an_old_delta_without_a_header_checksum_loads_with_a_note_and_migrates(good, tmp_path, capsys, caplog):
    with safe_open(str(good.path), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    old = tmp_path / f"old{deltas.DELTA_SUFFIX}"
    save_file(tensors, old, metadata={k: v for k, v in metadata.items() if k != deltas.HEADER_DIGEST})
    with caplog.at_level(logging.WARNING):
        loaded = deltas.read_delta(old)
    assert "without a header checksum" in caplog.text and "migrate" in caplog.text
    assert loaded.task == good.task and all(torch.equal(loaded.tensors[n], t) for n, t in good.tensors.items())
    new = tmp_path / f"new{deltas.DELTA_SUFFIX}"
    status, out, err = tiny.run_main(delta_cli.main, capsys, "migrate", old, "--out", new)
    assert status == 0 and "with a header checksum" in out, err
    with safe_open(str(new), framework="pt") as handle:
        assert handle.metadata()[deltas.HEADER_DIGEST] == metadata[deltas.HEADER_DIGEST]  # as train.py wrote it
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        deltas.read_delta(new)
    assert "header checksum" not in caplog.text


def test_two_fingerprints_that_differ_late_print_in_full(good, tiny_pretrained, tmp_path):
    from fairseq_ext.plugin.deltas import apply_delta

    fingerprint = good.base["fingerprint"]
    late = fingerprint[:-1] + ("0" if fingerprint[-1] != "0" else "1")
    other = dataclasses.replace(good, base={**good.base, "fingerprint": late})
    other.save(tmp_path / f"late{deltas.DELTA_SUFFIX}")
    with pytest.raises(UserError) as refused:
        apply_delta(tiny_pretrained, tmp_path / f"late{deltas.DELTA_SUFFIX}", tmp_path / "m.pt")
    assert fingerprint in str(refused.value) and late in str(refused.value)
