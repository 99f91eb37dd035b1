"""python -m fairseq_ext.tools.analysis bias-change: the paper's Figure 1 from real BitFit deltas."""
import csv

import torch

import fairseq_ext  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
import tiny
from fairseq_ext.core.delta_file import DELTA_SUFFIX, read_delta
from fairseq_ext.tools import analysis

BEST_DELTA = f"checkpoint_best{DELTA_SUFFIX}"


def test_bias_change_measures_each_term_and_layer_from_the_base(tiny_runs, tiny_pretrained, tmp_path, capsys):
    out = tmp_path / "analysis"
    status, _, err = tiny.run_main(analysis.main, capsys, "bias-change", "--base", tiny_pretrained,
                                   "--delta", f"ofa={tiny_runs / 'ofa' / BEST_DELTA}",
                                   "--delta", f"all={tiny_runs / 'all' / BEST_DELTA}", "--out", out)
    assert status == 0, err
    rows = list(csv.DictReader((out / "bias_change.csv").open()))
    base = torch.load(tiny_pretrained, map_location="cpu")["model"]
    trained = read_delta(tiny_runs / "all" / BEST_DELTA).tensors
    name = "encoder.sentence_encoder.layers.1.self_attn.q_proj.bias"
    expected = (trained[name].double() - base[name].double()).abs().mean().item()
    found = next(r for r in rows if (r["task"], r["term"], r["layer"]) == ("all", "q", "1"))
    assert abs(float(found["mean_abs_change"]) - expected) <= 1e-6 * expected
    # 'ofa' trains ln1, m2, m3, ln2 only; 'all' trains every layer term, in both layers.
    assert {r["term"] for r in rows if r["task"] == "ofa"} == {"ln1", "m2", "m3", "ln2"}
    assert {(r["term"], r["layer"]) for r in rows if r["task"] == "all"} == {
        (term, layer) for term in ("q", "k", "v", "m1", "ln1", "m2", "m3", "ln2") for layer in ("0", "1")}
    table = (out / "bias_change.md").read_text()
    assert "## ofa" in table and "## all" in table and "| q | – | – |" in table
    assert (out / "bias_change.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bias_change_refuses_another_base_a_checkpoint_and_a_control(tiny_runs, tiny_pretrained, tmp_path, capsys):
    other = torch.load(tiny_pretrained, map_location="cpu")
    other["model"]["encoder.sentence_encoder.layers.0.fc1.weight"] += 1e-3  # a frozen weight
    other_base = tmp_path / "other.pt"
    torch.save(other, other_base)
    delta = f"ofa={tiny_runs / 'ofa' / BEST_DELTA}"
    for base, given, message in (
        (other_base, delta, "is not the base"),
        (tiny_pretrained, f"ofa={tiny_runs / 'ofa' / 'checkpoint_best.pt'}", "a fairseq checkpoint, not a BitFit delta"),
    ):
        tiny.assert_one_line_error(tiny.run_main(analysis.main, capsys, "bias-change", "--base", base, "--delta", given,
                                                 "--out", tmp_path / "out"), message)
    assert not (tmp_path / "out").exists()
