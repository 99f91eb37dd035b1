"""How far each bias term moved from the pretrained base, per layer: the BitFit paper's Figure 1.

For every trained bias tensor of a transformer layer, the mean absolute change per
entry, ``mean(|trained - base|)``, grouped by the paper's symbols (q, k, v, m1, ln1,
m2, m3, ln2) and layer.  Cross-attention counts with its self-attention symbol, as
in the selection (``bitfit.PAPER_TERMS``); a layer with several tensors of a symbol
(a decoder's self- and cross-attention) averages over all their entries.
"""
import csv
import io
import math
import re
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from .bitfit import role_of

LAYER_TERMS = ("q", "k", "v", "m1", "ln1", "m2", "m3", "ln2")
_LAYER_INDEX = re.compile(r"(?:^|\.)layers\.(\d+)\.")

Table = Dict[str, Dict[int, float]]  # term -> layer -> mean absolute change per entry


def bias_changes(base: Mapping[str, torch.Tensor], trained: Mapping[str, torch.Tensor]) -> Table:
    """The mean absolute change per entry of every trained layer bias, by paper symbol and layer."""
    sums: Dict[str, Dict[int, List[float]]] = {}
    for name, tensor in trained.items():
        term, layer = role_of(name), _LAYER_INDEX.search(name)
        if term not in LAYER_TERMS or layer is None or name not in base:
            continue
        change = (tensor.detach().double() - base[name].detach().double()).abs()
        entry = sums.setdefault(term, {}).setdefault(int(layer.group(1)), [0.0, 0])
        entry[0] += float(change.sum())
        entry[1] += change.numel()
    return {term: {layer: total / count for layer, (total, count) in sorted(by_layer.items())}
            for term in LAYER_TERMS if term in sums for by_layer in [sums[term]]}


def layers_of(tables: Mapping[str, Table]) -> List[int]:
    return sorted({layer for table in tables.values() for by_layer in table.values() for layer in by_layer})


def to_markdown(tables: Mapping[str, Table]) -> str:
    """One table per task: a row per bias term, a column per layer, and each term's mean over layers."""
    layers = layers_of(tables)
    parts = ["# Bias change from the pretrained base",
             "",
             "Mean absolute change per entry, `mean(|trained - base|)`, of each bias term per layer "
             "(the BitFit paper's Figure 1); `–`: not trained in that run.",
             ""]
    for task, table in tables.items():
        parts += [f"## {task}", "",
                  "| term | " + " | ".join(f"layer {layer}" for layer in layers) + " | mean |",
                  "|---|" + "---:|" * (len(layers) + 1)]
        for term in LAYER_TERMS:
            values = [table.get(term, {}).get(layer) for layer in layers]
            present = [v for v in values if v is not None]
            cells = ["–" if v is None else f"{v:.2e}" for v in values]
            mean = f"{sum(present) / len(present):.2e}" if present else "–"
            parts.append(f"| {term} | " + " | ".join(cells) + f" | {mean} |")
        parts.append("")
    return "\n".join(parts)


def to_csv(tables: Mapping[str, Table]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["task", "term", "layer", "mean_abs_change"])
    for task, table in tables.items():
        for term, by_layer in table.items():
            for layer, value in by_layer.items():
                writer.writerow([task, term, layer, f"{value:.6e}"])
    return out.getvalue()


def heatmap_matrix(table: Table, layers: Sequence[int]) -> List[List[Optional[float]]]:
    """Rows LAYER_TERMS, columns ``layers``; None where a term was not trained."""
    return [[table.get(term, {}).get(layer) for layer in layers] for term in LAYER_TERMS]


def finite(values) -> List[float]:
    return [v for row in values for v in row if v is not None and math.isfinite(v)]
