"""The paper's random-subset controls: exact entry counts, and only the masked entries ever change."""
import pytest
import torch

import fairseq_ext  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
import tiny
from fairseq_ext.core import bitfit, controls
from fairseq_ext.core.delta_file import read_delta
from fairseq_ext.core.run_record import read_run_record
from fairseq_ext.plugin.deltas import apply_delta

SHAPES = {"layers.0.fc1.weight": (6, 4), "layers.0.fc2.weight": (4, 6), "layers.1.fc1.weight": (6, 4)}


@pytest.mark.parametrize("kind", controls.CONTROLS)
def test_masks_have_exactly_the_budget_and_follow_the_seed(kind):
    masks = controls.draw_masks(SHAPES, 17, kind, seed=3)
    assert controls.masked_entry_count(masks) == 17
    assert all(masks[name].shape == SHAPES[name] for name in masks)
    again = controls.draw_masks(SHAPES, 17, kind, seed=3)
    assert masks.keys() == again.keys() and all(torch.equal(masks[n], again[n]) for n in masks)
    other = controls.draw_masks(SHAPES, 17, kind, seed=4)
    assert any(not torch.equal(masks.get(n, torch.zeros(SHAPES[n], dtype=torch.bool)),
                               other.get(n, torch.zeros(SHAPES[n], dtype=torch.bool))) for n in SHAPES)
    for name, mask in masks.items():
        indices = controls.mask_indices(mask)
        assert torch.equal(controls.mask_from_indices(indices, mask.shape), mask)


def test_row_col_masks_are_whole_rows_and_columns_but_the_last():
    masks = controls.draw_masks(SHAPES, 30, controls.RAND_ROW_COL, seed=1)
    partial = 0
    for name, mask in masks.items():
        full_rows = mask.all(dim=1)
        full_cols = mask.all(dim=0)
        lines = mask.clone()
        lines[full_rows, :] = False
        lines[:, full_cols] = False
        partial += int(lines.sum())  # entries in neither a whole row nor a whole column
    assert controls.masked_entry_count(masks) == 30
    assert partial < max(max(shape) for shape in SHAPES.values())  # only the cut line is partial


def test_a_control_is_one_term_of_its_own():
    with pytest.raises(bitfit.SelectionError, match="controls of their own"):
        bitfit.parse_terms("q,rand_uniform")


@pytest.mark.parametrize("kind, extra", [
    ("rand_uniform", ["--weight-decay", "0.1"]),
    ("rand_row_col", ["--weight-decay", "0.1", "--bf16"]),  # fp32 master copies of bf16 weights
    ("rand_uniform", ["--memory-efficient-bf16", "--optimizer", "adam"]),
])
def test_only_masked_entries_change_through_training(tiny_data, tiny_pretrained, tmp_path, kind, extra):
    """Weight decay, Adam and master copies all move a trainable tensor; outside the mask nothing moves."""
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, tmp_path,
                              extra=["--bitfit", "--bitfit-terms", kind, "--seed", "5", *extra]))
    pretrained = torch.load(tiny_pretrained, map_location="cpu")["model"]
    finetuned = torch.load(tmp_path / "checkpoint_last.pt", map_location="cpu")
    saved = finetuned["optimizer_history"][-1]["bitfit"]
    assert saved["masks"]["seed"] == 5
    masks = {name: controls.mask_from_indices(indices, pretrained[name].shape)
             for name, indices in saved["masks"]["indices"].items()}
    record = read_run_record(tmp_path / "run_record.json")
    budget = record["bitfit"]["control"]["entries"]
    assert budget == controls.masked_entry_count(masks)
    # The budget is what the 'all' selection trains in bias terms (the LM head's are unused).
    all_biases = [n for n in pretrained if bitfit.is_bias(n) and "lm_head" not in n]
    assert budget == sum(pretrained[n].numel() for n in all_biases)
    heads = sum(p.numel() for n, p in finetuned["model"].items() if n.startswith("classification_heads."))
    assert record["parameters"]["trainable"] == budget + heads

    half = any(flag.endswith("bf16") for flag in extra)  # the run's weights are bf16, saved upcast
    changed_entries = 0
    for name, before in pretrained.items():
        if half and before.is_floating_point():
            before = before.bfloat16().float()
        after = finetuned["model"][name].to(before.dtype)
        if name in masks:
            moved = before != after
            assert not (moved & ~masks[name]).any(), f"{name}: an entry outside the mask changed"
            changed_entries += int(moved.sum())
        else:
            assert torch.equal(before, after), f"{name} is outside the control but changed"
    assert changed_entries > budget // 2  # the masked entries did train

    # The delta holds the masked entries (indices and values), not the matrices, and applies exactly.
    delta = read_delta(tmp_path / "checkpoint_last.delta.safetensors")
    assert set(delta.masked_entries()) == set(masks)
    assert not any(name in delta.tensors for name in masks)
    assert sum(values.numel() for _, values in delta.masked_entries().values()) == budget
    merged = tmp_path / "merged.pt"
    apply_delta(tiny_pretrained, tmp_path / "checkpoint_last.delta.safetensors", merged)
    rebuilt = torch.load(merged, map_location="cpu")["model"]
    for name, tensor in finetuned["model"].items():
        assert torch.equal(rebuilt[name], tensor), name
