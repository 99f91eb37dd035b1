"""Analyses of BitFit runs from their deltas: the bias-change figure (the BitFit paper's Figure 1).

``bias_change_tables`` checks each delta against the base it must come from and measures how
far every bias term moved, per layer (``core.bias_change``); ``write_bias_change`` writes
``bias_change.md``, ``.csv`` and ``.png`` (a heatmap, one panel per task).  The CLI is
``python -m fairseq_ext.tools.analysis bias-change``; the GLUE runner calls them for each
task's best BitFit run.
"""
from pathlib import Path
from typing import Dict, Mapping

from ..core import bias_change
from ..core.controls import CONTROLS
from ..core.delta_file import DELTA_SUFFIX, check_base_fingerprint, check_delta_fits, read_delta
from ..core.errors import UserError
from ..core.files import write_atomically, write_text_atomically
from .checkpoints import load_checkpoint_file
from .deltas import check_base_model, shared_model

BIAS_CHANGE_FILES = ("bias_change.md", "bias_change.csv", "bias_change.png")


def base_checkpoint_path(base) -> Path:
    """A model folder's model.pt, or the checkpoint file given."""
    path = Path(base)
    return path / "model.pt" if path.is_dir() else path


def bias_change_tables(base, deltas: Mapping[str, str], trust_checkpoint: bool = False) -> Dict[str, bias_change.Table]:
    """{task: its bias-change table}, each delta checked against the base it must come from."""
    base_checkpoint = load_checkpoint_file(base_checkpoint_path(base), trust_checkpoint)
    return {task: delta_bias_change(base_checkpoint, delta_path, f"--delta {task}={delta_path}", f"--base {base}")
            for task, delta_path in deltas.items()}


def delta_bias_change(base_checkpoint: dict, delta_path, source: str, base_source: str) -> bias_change.Table:
    """One delta's bias-change table against the loaded base checkpoint (UserError if it is not its base)."""
    if not str(delta_path).endswith(DELTA_SUFFIX) and str(delta_path).endswith(".pt"):
        raise UserError(f"{source}: a fairseq checkpoint, not a BitFit delta; give the "
                        f"NAME{DELTA_SUFFIX} that train.py --bitfit writes beside it")
    delta = read_delta(delta_path)
    if delta.selection.get("terms") in CONTROLS:
        raise UserError(f"{source}: a random-subset control ({delta.selection['terms']}) trains weight entries, "
                        "not bias terms: there is no bias change to show")
    check_base_model(base_checkpoint, delta, base_source)
    model = shared_model(delta, base_checkpoint["model"], base_source, "cpu")
    state = model.state_dict()
    check_base_fingerprint(state, delta, base_source, force_flag=None)
    # Shapes as the base's (read_delta checked the delta against itself); float32 like the model.
    check_delta_fits(model, {name: tensor.float() for name, tensor in delta.body_tensors(state).items()}, source)
    table = bias_change.bias_changes(state, delta.body_tensors())
    if not table:
        raise UserError(f"{source}: trains no layer bias term (selection {delta.selection.get('terms')!r})")
    return table


def write_bias_change(tables: Mapping[str, bias_change.Table], out_dir) -> Path:
    """bias_change.md, .csv and .png in ``out_dir`` (made if needed)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "bias_change.md", bias_change.to_markdown(tables))
    write_text_atomically(out / "bias_change.csv", bias_change.to_csv(tables))
    plot_bias_change(tables, out / "bias_change.png")
    return out


def plot_bias_change(tables: Mapping[str, bias_change.Table], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors
    import matplotlib.pyplot as plt
    import numpy as np

    layers = bias_change.layers_of(tables)
    matrices = {task: bias_change.heatmap_matrix(table, layers) for task, table in tables.items()}
    values = [v for m in matrices.values() for v in bias_change.finite(m) if v > 0]
    norm = matplotlib.colors.LogNorm(vmin=min(values), vmax=max(values)) if values else None
    fig, axes = plt.subplots(1, len(tables), figsize=(len(tables) * (0.55 * len(layers) + 1.6) + 1.2, 3.4),
                             squeeze=False)
    image = None
    for ax, (task, matrix) in zip(axes[0], matrices.items()):
        data = np.ma.masked_invalid(np.array([[np.nan if v is None else v for v in row] for row in matrix]))
        image = ax.imshow(data, cmap="viridis", norm=norm, aspect="auto")
        ax.set_title(task)
        ax.set_xticks(range(len(layers)), [str(layer) for layer in layers])
        ax.set_yticks(range(len(bias_change.LAYER_TERMS)), bias_change.LAYER_TERMS)
        ax.set_xlabel("layer")
    if image is not None:
        fig.colorbar(image, ax=axes[0].tolist(), label="mean |change| per entry")
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight"))
    plt.close(fig)
