"""BitFit deltas: written next to every checkpoint of a --bitfit run, merged back exactly, bad input refused.

One tiny RoBERTa BitFit run (train.py, the GLUE recipe with epoch and interval
checkpoints) serves most tests; the delta-only tests make their own runs.
"""
import argparse
import datetime
import json
import shutil

import pytest
import torch

import fairseq_ext  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
import tiny
from fairseq_ext.core import delta_file as deltas
from fairseq_ext.core.errors import UserError
from fairseq_ext.tools import delta as delta_cli

UPDATES = 12  # 160 rows, batch 16: epoch 1 ends at update 10


def bitfit_recipe(data, pretrained, save_dir, *extra):
    """The tiny GLUE recipe with --bitfit, epoch checkpoints and a checkpoint every 5 updates."""
    recipe = tiny.glue_recipe(data, pretrained, save_dir, updates=UPDATES,
                              extra=["--bitfit", "--save-interval-updates", "5", *extra])
    return [arg for arg in recipe if arg != "--no-epoch-checkpoints"]


@pytest.fixture(scope="module")
def bitfit_run(tiny_data, tiny_pretrained, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("bitfit_run")
    tiny.run(bitfit_recipe(tiny_data, tiny_pretrained, save_dir))
    return save_dir


def load(path):
    return torch.load(path, map_location="cpu")


def checkpoint_names(folder):
    return sorted(path.name[:-3] for path in folder.glob("*.pt"))


def delta_names(folder):
    return sorted(path.name[:-len(deltas.DELTA_SUFFIX)] for path in folder.glob("*" + deltas.DELTA_SUFFIX))


def run_cli(capsys, *argv):
    return tiny.run_main(delta_cli.main, capsys, *argv)


def head_logits(checkpoint, data, model=None):
    """Classification logits of the first validation batch, through fairseq's own loading."""
    from fairseq import checkpoint_utils

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)],
                                                                      arg_overrides={"data": str(data)})
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    sample = dataset.collater([dataset[i] for i in range(16)])
    with torch.no_grad():
        logits, _ = models[0].eval()(**sample["net_input"], features_only=True,
                                     classification_head_name=cfg.task.classification_head_name)
    return logits


# ------------------------------------------------------------------ writing


def test_every_checkpoint_gets_a_delta_of_its_trained_tensors(bitfit_run, tiny_pretrained, tiny_data):
    names = checkpoint_names(bitfit_run)
    assert names == ["checkpoint1", "checkpoint_1_5", "checkpoint_best", "checkpoint_last"]
    assert delta_names(bitfit_run) == names  # fairseq's copies (best -> last) carry their delta along
    pretrained = load(tiny_pretrained)["model"]
    for name in names:
        full = load(bitfit_run / f"{name}.pt")
        delta = deltas.read_delta(bitfit_run / f"{name}{deltas.DELTA_SUFFIX}")
        trained = full["optimizer_history"][-1]["bitfit"]["trainable"]
        heads = [n for n in full["model"] if n.startswith("classification_heads.")]
        assert sorted(delta.tensors) == sorted(set(trained) | set(heads)), name
        for tensor_name, tensor in delta.tensors.items():
            assert torch.equal(tensor, full["model"][tensor_name]), (name, tensor_name)
        assert delta.progress["num_updates"] == full["optimizer_history"][-1]["num_updates"]
        # The fingerprint computed from the pretrained file itself matches.
        assert deltas.tensors_fingerprint(deltas.frozen_base_tensors(pretrained, delta.tensors)) \
            == delta.base["fingerprint"]
        delta_size = (bitfit_run / f"{name}{deltas.DELTA_SUFFIX}").stat().st_size
        assert delta_size < (bitfit_run / f"{name}.pt").stat().st_size / 5

    delta = deltas.read_delta(bitfit_run / f"checkpoint_best{deltas.DELTA_SUFFIX}")
    assert delta.selection["terms"] == "ofa" and delta.selection["train_heads"] and not delta.selection["delta_only"]
    assert delta.task_name == "sentence_prediction" and delta.head_name == "sentence_classification_head"
    assert delta.task_cfg["num_classes"] == 2 and not delta.regression
    label_lines = (tiny_data / "label" / "dict.txt").read_text().split("\n")[:2]
    assert delta.label_symbols == [line.split()[0] for line in label_lines]
    assert delta.arch == "roberta" and delta.model["namespace"] and delta.model["args"]["encoder_layers"] == 2
    from fairseq.data import Dictionary

    dictionary = Dictionary.load(str(tiny_data / "input0" / "dict.txt"))
    dictionary.add_symbol("<mask>")
    assert delta.dictionary == deltas.dictionary_identity(dictionary) and delta.base["dtype"] == "float32"


def test_roberta_base_delta_is_under_one_percent_of_the_model(monkeypatch):
    """Sizes only: roberta_base with a 2-class head, built on the meta device (no weights)."""
    from fairseq.data import Dictionary
    from fairseq.models.roberta import model as roberta_model

    # fairseq's BERT init copies weights through .cpu(), which meta tensors cannot: skip it (sizes only).
    monkeypatch.setattr(roberta_model, "init_bert_params", lambda module: None)

    from fairseq_ext import bitfit
    from fairseq_ext.plugin.models.build import architecture_config, build_fairseq_model

    dictionary = Dictionary()
    for index in range(50261):  # RoBERTa's dict.txt (+ <mask>): 50,265 symbols
        dictionary.add_symbol(str(index))
    dictionary.add_symbol("<mask>")
    with torch.device("meta"):
        model_cfg = architecture_config("roberta_base", arch="roberta_base", max_positions=512)
        model = build_fairseq_model(model_cfg, dictionary)
        model.register_classification_head("sentence_classification_head", num_classes=2)
    selection = bitfit.select(model, "ofa")
    state = model.state_dict()
    model_bytes = sum(tensor.numel() * tensor.element_size() for tensor in state.values())
    delta_params = sum(state[name].numel() for name in selection.names)
    assert 650_000 < delta_params < 670_000  # 64,512 OFA biases (+ lm_head.layer_norm.bias) + 592,130 head
    assert delta_params * 4 < 0.01 * model_bytes


# ------------------------------------------------------------------ apply


@pytest.mark.parametrize("name", ["checkpoint_best", "checkpoint1"])
def test_apply_rebuilds_the_full_checkpoint_exactly(bitfit_run, tiny_pretrained, tiny_data, tmp_path, capsys, name):
    merged = tmp_path / "merged.pt"
    status, out, err = run_cli(capsys, "apply", "--base", tiny_pretrained,
                               "--delta", bitfit_run / f"{name}{deltas.DELTA_SUFFIX}", "--out", merged)
    assert status == 0, err
    full, rebuilt = load(bitfit_run / f"{name}.pt")["model"], load(merged)["model"]
    assert list(rebuilt) == list(full)
    for tensor_name, tensor in full.items():
        assert torch.equal(rebuilt[tensor_name], tensor) and rebuilt[tensor_name].dtype == tensor.dtype, tensor_name
    assert torch.equal(head_logits(merged, tiny_data), head_logits(bitfit_run / f"{name}.pt", tiny_data))


def test_merged_checkpoint_restores_in_train_py(bitfit_run, tiny_pretrained, tiny_data, tmp_path, capsys):
    merged = tmp_path / "merged.pt"
    assert run_cli(capsys, "apply", "--base", tiny_pretrained, "--delta",
                   bitfit_run / f"checkpoint_best{deltas.DELTA_SUFFIX}", "--out", merged)[0] == 0
    tiny.run(tiny.glue_recipe(tiny_data, merged, tmp_path / "again", updates=1, extra=["--bitfit"]))
    again = load(tmp_path / "again" / "checkpoint_last.pt")
    trained = set(again["optimizer_history"][-1]["bitfit"]["trainable"])
    for tensor_name, tensor in load(merged)["model"].items():
        if tensor_name not in trained:
            assert torch.equal(again["model"][tensor_name], tensor), tensor_name


def test_info_prints_metadata_and_sizes(bitfit_run, capsys):
    path = bitfit_run / f"checkpoint_best{deltas.DELTA_SUFFIX}"
    status, out, _ = run_cli(capsys, "info", path)
    assert status == 0
    assert f"{path.stat().st_size:,} bytes" in out and "--bitfit-terms ofa, heads trained" in out
    assert "head 'sentence_classification_head'" in out and "arch roberta" in out and "sha256:" in out
    status, out, _ = run_cli(capsys, "info", "--json", path)
    sections = json.loads(out)
    assert sections["task"]["cfg"]["num_classes"] == 2 and sections["model"]["arch"] == "roberta"


# ------------------------------------------------------------------ --bitfit-delta-only


def test_delta_only_run_keeps_one_full_checkpoint_and_resumes_exactly(bitfit_run, tiny_data, tiny_pretrained, tmp_path):
    """Interrupted after 6 updates and relaunched, a delta-only run ends as the straight full run."""
    save_dir = tmp_path / "delta_only"
    tiny.run(bitfit_recipe(tiny_data, tiny_pretrained, save_dir, "--bitfit-delta-only", "--max-update", "6"))
    assert checkpoint_names(save_dir) == ["checkpoint_last"]
    second = tiny.run(bitfit_recipe(tiny_data, tiny_pretrained, save_dir, "--bitfit-delta-only"))
    assert "resuming the interrupted run" in second.stdout

    assert checkpoint_names(save_dir) == ["checkpoint_last"]
    assert delta_names(save_dir) == delta_names(bitfit_run)
    straight = load(bitfit_run / "checkpoint_last.pt")["model"]
    resumed = load(save_dir / "checkpoint_last.pt")["model"]
    assert all(torch.equal(resumed[name], tensor) for name, tensor in straight.items())
    for name in delta_names(bitfit_run):
        a = deltas.read_delta(save_dir / f"{name}{deltas.DELTA_SUFFIX}")
        b = deltas.read_delta(bitfit_run / f"{name}{deltas.DELTA_SUFFIX}")
        assert a.selection["delta_only"] and a.base == b.base
        assert all(torch.equal(a.tensors[n], t) for n, t in b.tensors.items()), name


def test_delta_only_needs_bitfit():
    from fairseq_ext.training.options import validate_bitfit_args

    args = argparse.Namespace(bitfit=False, bitfit_terms="ofa", bitfit_delta_only=True, ddp_backend="pytorch_ddp")
    with pytest.raises(UserError, match="--bitfit-delta-only needs --bitfit"):
        validate_bitfit_args(args)


# ------------------------------------------------------------------ bad input


assert_one_line_error = tiny.assert_one_line_error


@pytest.fixture
def best_delta(bitfit_run, tmp_path):
    path = tmp_path / "best.delta.safetensors"
    shutil.copyfile(bitfit_run / f"checkpoint_best{deltas.DELTA_SUFFIX}", path)
    return path


def test_corrupt_or_truncated_deltas_are_refused(best_delta, tiny_pretrained, tmp_path, capsys):
    data = best_delta.read_bytes()
    header_size = int.from_bytes(data[:8], "little")
    plain = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(2)}, plain)
    bad = {
        "truncated": (data[: len(data) // 2], "truncated or corrupt"),
        "garbage": (b"not a safetensors file at all", "truncated or corrupt"),
        # One byte of tensor data changed: safetensors cannot tell, the header checksum can.
        "flipped": (data[:-1] + bytes([data[-1] ^ 0xFF]), "do not match the checksum"),
        "plain": (plain.read_bytes(), "not a BitFit delta"),
    }
    assert 8 + header_size < len(data)
    for name, (content, message) in bad.items():
        path = tmp_path / f"{name}.delta.safetensors"
        path.write_bytes(content)
        assert_one_line_error(run_cli(capsys, "info", path), message)
        out = tmp_path / f"{name}.pt"
        assert_one_line_error(run_cli(capsys, "apply", "--base", tiny_pretrained, "--delta", path, "--out", out),
                              message)
        assert not out.exists() and not list(tmp_path.glob(f".{name}.pt.tmp*"))
    assert_one_line_error(run_cli(capsys, "info", tmp_path / "missing.safetensors"), "no such delta file")


def test_a_delta_is_refused_on_another_base_unless_forced(best_delta, tiny_pretrained, tmp_path, capsys):
    other = load(tiny_pretrained)
    other["model"]["encoder.sentence_encoder.layers.0.fc1.weight"] += 1e-3  # a frozen weight
    other_base = tmp_path / "other.pt"
    torch.save(other, other_base)
    out = tmp_path / "merged.pt"
    assert_one_line_error(run_cli(capsys, "apply", "--base", other_base, "--delta", best_delta, "--out", out),
                          "is not the base", "fingerprint", "--force")
    assert not out.exists()
    status, _, err = run_cli(capsys, "apply", "--base", other_base, "--delta", best_delta, "--out", out, "--force")
    assert status == 0 and out.exists() and "--force: merging anyway" in err


def test_a_delta_for_another_architecture_is_refused(best_delta, tmp_path, capsys):
    from fairseq.data import Dictionary

    from fairseq_ext.plugin.models.build import architecture_config, build_fairseq_model

    dictionary = Dictionary()
    for index in range(53):
        dictionary.add_symbol(f"w{index}")
    model_cfg = architecture_config("bert_tiny", arch="bert_tiny", max_positions=64)
    model = build_fairseq_model(model_cfg, dictionary)
    bert_base = tmp_path / "bert.pt"
    torch.save({"cfg": {"model": model_cfg}, "model": model.state_dict(), "extra_state": {},
                "optimizer_history": [{"num_updates": 0}]}, bert_base)
    out = tmp_path / "merged.pt"
    assert_one_line_error(run_cli(capsys, "apply", "--base", bert_base, "--delta", best_delta, "--out", out),
                          "a bert model (arch bert_tiny)", "classification delta", "arch roberta")
    assert not out.exists()


def test_only_trusted_checkpoints_are_unpickled(best_delta, tiny_pretrained, tmp_path, capsys):
    checkpoint = load(tiny_pretrained)
    checkpoint["extra_state"]["saved_on"] = datetime.date(2024, 1, 1)  # outside the allow-list
    untrusted = tmp_path / "untrusted.pt"
    torch.save(checkpoint, untrusted)
    out = tmp_path / "merged.pt"
    assert_one_line_error(run_cli(capsys, "apply", "--base", untrusted, "--delta", best_delta, "--out", out),
                          "allow-list", "--trust-checkpoint")
    assert not out.exists()
    status, _, err = run_cli(capsys, "apply", "--base", untrusted, "--delta", best_delta, "--out", out,
                             "--trust-checkpoint")
    assert status == 0, err


def test_cli_exits_2_with_one_line(best_delta, tmp_path):
    result = tiny.run(["-m", "fairseq_ext.tools.delta", "apply", "--base", str(tmp_path / "nope.pt"),
                       "--delta", str(best_delta), "--out", str(tmp_path / "m.pt")], check=False)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        f"delta.py: error: --base {tmp_path / 'nope.pt'}: no such file"]


def test_malformed_headers_and_output_paths_are_one_line_errors(best_delta, tiny_pretrained, tmp_path, capsys):
    from safetensors import safe_open
    from safetensors.torch import save_file

    with safe_open(str(best_delta), framework="pt") as handle:
        metadata, tensors = handle.metadata(), {name: handle.get_tensor(name) for name in handle.keys()}
    base = json.loads(metadata["base"])
    for name, section, value, message in (
        ("null_selection", "selection", None, "'selection' is not a JSON object"),
        ("empty_base", "base", {}, "'base' has no 'fingerprint'"),
        ("bad_dtype", "base", dict(base, dtype="float77"), "base dtype 'float77'"),
    ):
        path = tmp_path / f"{name}.delta.safetensors"
        save_file(tensors, path, metadata=dict(metadata, **{section: json.dumps(value)}))
        assert_one_line_error(run_cli(capsys, "info", path), "corrupt delta", message)
        assert_one_line_error(run_cli(capsys, "apply", "--base", tiny_pretrained, "--delta", path,
                                      "--out", tmp_path / "m.pt"), "corrupt delta", message)
    folder = tmp_path / "a_folder"
    folder.mkdir()
    for out, message in ((folder, "is a folder"), (tmp_path / "nowhere" / "m.pt", "no such folder")):
        assert_one_line_error(run_cli(capsys, "apply", "--base", tiny_pretrained, "--delta", best_delta, "--out", out),
                              "--out", message)
