"""Every change this package makes to fairseq's own behaviour, in one place.

``PATCHES`` lists each one: what it replaces, extends or relies on (a dotted path
into fairseq, or torch), when it is in effect, and why.  ``install()`` applies the
ones that hold whenever the plugin is loaded; train.py calls it, and so does the
plugin's registration (``import fairseq_ext`` or ``--user-dir fairseq_ext``).  The
others are scoped: train.py's Trainer and progress bars while fairseq's training
loop runs (``fairseq_train_with``), the delta-following checkpoint copies of BitFit
runs (``route_checkpoint_copies``), the cached module walks of each trained model
(``cache_module_walks``), and the benchmark's CUDA peak counter.  The registry and
``install()`` live here; each scoped patch lives in a module of its user's
(``training_loop``, ``checkpoint_copies``, ``module_walks``, ``attention_projections``,
``cuda_memory``, ``generation``, ``layer_input``), and every name is importable from
this package as before.

Each patch was checked against ``CHECKED_AGAINST``.  ``tests/test_patches.py``
checks that every target still exists in the installed fairseq, with the shape
each patch assumes, so an upgrade fails loudly instead of silently changing what
a run does.  docs/fairseq_patches.md explains each one for a reader.
"""
import contextlib
import importlib
import logging
import warnings
from dataclasses import dataclass
from typing import List, Tuple

import torch


@contextlib.contextmanager
def quiet_fairseq_import():
    """Import fairseq without it reconfiguring logging for the whole program.

    fairseq's wav2vec2_classification.py runs logging.basicConfig(level=DEBUG) when
    fairseq is first imported, and its text_to_speech task logs "Please install
    tensorboardX" through the root logger: the root logger is put back as it was,
    and that one logger is hushed.
    """
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    logging.getLogger("fairseq.tasks.text_to_speech").setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.setLevel(level)
        root.handlers[:] = handlers


with quiet_fairseq_import():  # the first fairseq import: it loads all of fairseq, the modules below use included
    from fairseq import models
    from fairseq.distributed import utils as distributed_utils

from ..checkpoints import FAIRSEQ_CHECKPOINT_TYPES
from . import numpy2

CHECKED_AGAINST = "ve-fairseq 0.12.3"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Patch:
    """One change to fairseq's behaviour, or one private fairseq detail this package relies on."""

    name: str
    target: str  # dotted path: fairseq's function, class or attribute this patch is about
    action: str  # "replaces", "extends" (subclass or wrapper) or "relies on"
    when: str  # "install()" or the scope it is in effect for
    why: str
    # Text that must appear in the target's source, in this order: the fairseq code shape the patch assumes.
    source_has: Tuple[str, ...] = ()


PATCHES: Tuple[Patch, ...] = (
    Patch("quiet-import", "fairseq.models.wav2vec.wav2vec2_classification", "extends", "the first fairseq import",
          "it calls logging.basicConfig(level=DEBUG) when fairseq is imported: a library import must not "
          "switch the whole program to DEBUG logging; the root logger is put back as it was",
          source_has=("logging.basicConfig(level=logging.DEBUG)",)),
    Patch("quiet-import", "fairseq.tasks.text_to_speech", "extends", "the first fairseq import",
          "it logs 'Please install tensorboardX' at import through a root handler of its own: hushed",
          source_has=("logging.basicConfig(", "Please install tensorboardX")),
    Patch("quiet-warnings", "fairseq.tasks.fairseq_task.FairseqTask.train_step", "extends", "install()",
          "fairseq calls the deprecated torch.cuda.amp.autocast at every step and asks its data loaders for "
          "pinned memory, which a CPU-only machine warns about: two warnings with nothing to act on, filtered",
          source_has=("torch.cuda.amp.autocast(",)),
    Patch("safe-checkpoint-types", "torch.serialization.add_safe_globals", "extends", "install()",
          "fairseq calls torch.load without weights_only; torch >= 2.6 then rejects argparse.Namespace and "
          "numpy scalars in every fairseq checkpoint. Allow-listing exactly those keeps loading safe"),
    Patch("rank-broadcast", "fairseq.distributed.utils._broadcast_object_slow", "replaces", "install()",
          "fairseq sends the loaded checkpoint to the other ranks with torch.save/torch.load, and the safe "
          "loader rejects its omegaconf cfg; rank 0 read the file safely, so plain pickling between ranks "
          "(torch.distributed.broadcast_object_list) is sound"),
    Patch("bert-arch-names", "fairseq.models.ARCH_MODEL_REGISTRY", "replaces", "install()",
          "fairseq's deprecated masked_lm model registers the arch names bert_base and bert_large; "
          "the plugin's bert model takes them over"),
    Patch("bitfit-trainer", "fairseq_cli.train.Trainer", "replaces", "fairseq_train_with() (train.py)",
          "fairseq_cli.train.main builds the model, then the Trainer; train.py's Trainer freezes the model "
          "in between, before the optimizer, fp16 master copies and DDP buckets exist"),
    Patch("recorded-progress-bars", "fairseq.logging.progress_bar.progress_bar", "extends",
          "fairseq_train_with() (train.py)",
          "what fairseq's training loop prints at each epoch end and validation also goes to the run's "
          "machine-readable record (run_record.json), not only into log text"),
    Patch("update-hooks", "fairseq_cli.train.validate_and_save", "extends", "fairseq_train_with() (train.py)",
          "fairseq's loop calls it once per update, after deciding whether to validate and save; train.py's "
          "progress (in the run record) and its --save-interval-minutes saves run right after it",
          source_has=("def validate_and_save(", "end_of_epoch: bool", "return valid_losses, should_stop")),
    Patch("update-hooks", "fairseq_cli.train.train", "relies on", "fairseq_train_with() (train.py)",
          "the epoch loop calls validate_and_save after every update, by its module-level name",
          source_has=("log_output = trainer.train_step(samples)", "valid_losses, should_stop = validate_and_save(")),
    Patch("patience-state", "fairseq_cli.train.should_stop_early", "relies on", "train.py (training.stop_rules)",
          "--patience's state lives in this function's attributes best and num_runs, in memory only: train.py "
          "saves them with every checkpoint and restores them on resume, so a restarted run stops where an "
          "uninterrupted one does",
          source_has=('getattr(should_stop_early, "best", None)', "should_stop_early.num_runs += 1",
                      "if should_stop_early.num_runs >= cfg.checkpoint.patience:")),
    Patch("patience-state", "fairseq_cli.train.train", "extends", "fairseq_train_with() (train.py)",
          "a resumed run whose patience had already run out when it saved trains no further epoch: the "
          "epoch function returns 'stop' at once, and fairseq's main loop ends as after an early stop",
          source_has=("def train(", "return valid_losses, should_stop")),
    Patch("patience-state", "fairseq_cli.train.main", "relies on", "fairseq_train_with() (train.py)",
          "the main loop calls the epoch function by its module-level name and ends when it says stop",
          source_has=("valid_losses, should_stop = train(cfg, trainer, task, epoch_itr)", "if should_stop:")),
    Patch("whole-checkpoints", "fairseq.checkpoint_utils.save_checkpoint", "extends", "fairseq_train_with() (train.py)",
          "Ctrl-C or SIGTERM while fairseq writes a checkpoint and copies it to its other names (best -> last) "
          "would leave a truncated checkpoint_last.pt; the signal waits until the save is done. fairseq keeps "
          "the best score as an attribute of this function, so the wrapper forwards attributes to it",
          source_has=("save_checkpoint.best = ", "PathManager.copy(")),
    Patch("stop-batch-prefetching", "fairseq.data.iterators.BackgroundConsumer.run", "relies on",
          "stop_batch_prefetching() (end of each train.py training process)",
          "fairseq prefetches batches in a daemon thread; when training stops before an epoch's end "
          "(--max-update) it is still collating at exit, and CPython ends it inside a torch call, which "
          "aborts the finished process ('terminate called without an active exception', exit -6). The "
          "threads are told to stop and drained first",
          source_has=("self._max_len is not None and self.count >= self._max_len", "self._queue.put(_sentinel)")),
    Patch("delta-following-copies", "fairseq.checkpoint_utils.PathManager", "extends",
          "route_checkpoint_copies() (BitFit runs)",
          "fairseq saves a checkpoint once and copies it to the other names due (best -> last); a "
          "BitFit delta must follow each copy, and delta-only runs skip the full copy"),
    Patch("cached-module-walks", "fairseq.models.BaseFairseqModel.set_num_updates", "extends",
          "cache_module_walks() (every train.py model)",
          "every update fairseq walks the module tree for train() twice and for set_num_updates "
          "quadratically through nested encoders: milliseconds of Python per update that change nothing"),
    Patch("cached-module-walks", "fairseq.models.FairseqEncoder.set_num_updates", "extends",
          "cache_module_walks() (every train.py model)", "as above: FairseqEncoder's version only forwards"),
    Patch("tuned-projections", "fairseq.modules.multihead_attention.MultiheadAttention.forward",
          "replaces", "projections_as_modules(): LoRA and IA3 runs, and predictors serving their deltas unmerged",
          "fairseq's fast path reads q_proj.weight and its siblings into torch's multi_head_attention_forward, "
          "so a projection a tuner wraps (PEFT's LoRA or IA3 layer) would be skipped silently; each attention "
          "module with a wrapped projection computes through its modules with scaled_dot_product_attention and "
          "fairseq's attention dropout, in training too",
          source_has=("and not self.skip_embed_dim_check", "F.multi_head_attention_forward(",
                      "self.q_proj.weight")),
    Patch("attention-through-projections", "fairseq.modules.multihead_attention.MultiheadAttention.forward",
          "replaces", "attention_through_projections() (the predictor's mixed-task batches)",
          "fairseq's attention hands its q/k/v/out biases to torch's multi_head_attention_forward, where no hook "
          "can reach them; for the block, eval-mode self-attention runs its q/k/v/out projection modules and "
          "torch's scaled_dot_product_attention, as that function does, and anything else fairseq's own path "
          "that calls the projection modules (skip_embed_dim_check)",
          source_has=("and not self.skip_embed_dim_check", "F.multi_head_attention_forward(",
                      "use_separate_proj_weight=True", "q = self.q_proj(query)", "q *= self.scaling",
                      "attn = self.out_proj(attn)")),
    Patch("cuda-peak-memory", "torch.cuda.reset_peak_memory_stats", "extends", "cuda_peak_memory() (benchmark; a train.py run on CUDA, for its run record)",
          "fairseq's train_step resets the CUDA peak after every update; the benchmark reads each peak "
          "before it is reset"),
    Patch("resume-check-hook", "fairseq.trainer.Trainer.load_checkpoint", "relies on", "BitFitTrainer",
          "BitFitTrainer checks a resumed checkpoint's selection in _build_optimizer, which "
          "load_checkpoint calls after reading the optimizer history and before loading optimizer state",
          source_has=("self._optim_history = state[\"optimizer_history\"]", "self._build_optimizer()",
                      "self.optimizer.load_state_dict(")),
    Patch("lazy-ddp-wrapper", "fairseq.trainer.Trainer.model", "relies on", "BitFitTrainer",
          "BitFitTrainer builds its own DDP wrapper (legacy_ddp sized by the trained tensors, c10d on CPU) "
          "by filling _wrapped_model before fairseq's property does",
          source_has=("if self._wrapped_model is None:", "self.use_distributed_wrapper")),
    Patch("trainable-only-optimizer", "fairseq.trainer.Trainer._build_optimizer", "relies on", "BitFitTrainer",
          "freezing before the Trainer exists is enough because the optimizer is built from the parameters "
          "that require grad",
          source_has=("filter(", "lambda p: p.requires_grad")),
    Patch("models-in-memory", "fairseq.checkpoint_utils.load_model_ensemble", "replaces",
          "models_in_memory() (python -m fairseq_ext.tools.generate --delta)",
          "fairseq-generate reads its model from the --path file; generating from a base plus a BitFit delta "
          "without writing a merged checkpoint hands fairseq's own generation the model already built in "
          "memory for that path (any other path, an --lm-path, loads as usual)"),
    Patch("models-in-memory", "fairseq.checkpoint_utils.load_model_ensemble_and_task", "replaces",
          "ensemble_in_memory() (python -m fairseq_ext.tools.eval_lm --delta)",
          "fairseq-eval-lm loads its model with load_model_ensemble_and_task (load_model_ensemble's own call): "
          "evaluating a base plus a language-model delta hands it the model built in memory for that one path"),
    Patch("numpy2-compat-long", "fairseq.data.token_block_dataset.TokenBlockDataset.__init__", "relies on",
          "install()",
          "fairseq 0.12 reads numpy.compat.long (break_mode eos: language-model prompts, --sample-break-mode eos; "
          "LanguagePairDataset's num_tokens_vec), which numpy 2 removed; numpy 1's value, int, is put back where "
          "numpy lacks it"),
    Patch("models-in-memory", "fairseq_cli.generate._main", "relies on",
          "models_in_memory() (python -m fairseq_ext.tools.generate --delta)",
          "fairseq-generate loads its models through the checkpoint_utils module attribute, with the task it set "
          "up from the command line, and only then reads the test set with the returned config's task",
          source_has=("task = tasks.setup_task(cfg.task)", "checkpoint_utils.load_model_ensemble(",
                      "task=task", "task.load_dataset(cfg.dataset.gen_subset, task_cfg=saved_cfg.task)",
                      "model.prepare_for_inference_(cfg)")),
    Patch("models-in-memory", "fairseq_cli.interactive.main", "relies on",
          "models_in_memory() (python -m fairseq_ext.tools.generate --interactive --delta)",
          "fairseq-interactive loads its models the same way, with the task it set up from the command line",
          source_has=("task = tasks.setup_task(cfg.task)", "checkpoint_utils.load_model_ensemble(", "task=task",
                      "model.prepare_for_inference_(cfg)")),
    Patch("contiguous-layer-input", "fairseq.models.transformer.TransformerEncoderBase.forward_scriptable",
          "relies on", "contiguous_layer_input() (BitFit runs)",
          "the encoder hands its first layer x.transpose(0, 1) of the (B, T, C) embeddings: a strided view. When "
          "it requires grad (a BitFit run trains the embedding LayerNorm bias, or anything below layer 0's "
          "projections), torch's linear on it takes matmul -> bmm with an expanded weight, in the forward and the "
          "backward. A forward pre-hook on the first layer makes its input contiguous (one copy); values are "
          "unchanged. Runs without --bitfit keep fairseq's path (their numbers equal fairseq-train's)",
          source_has=("x, encoder_embedding = self.forward_embedding(src_tokens, token_embeddings)",
                      "x = x.transpose(0, 1)", "for layer in self.layers:")),
    Patch("foreach-adam", "fairseq.optim.adam.Adam.step", "replaces",
          "foreach_adam() (every train.py run with --optimizer adam; dense fp32 CPU tensors)",
          "fairseq's Adam runs about ten tensor operations from Python per parameter: for a BitFit run's hundred "
          "small bias tensors that loop is the optimizer's time. The same operations in the same order over the "
          "list (torch._foreach_*), which on CPU torch runs as the same per-tensor kernels: fairseq's numbers bit "
          "for bit, full fine-tuning included; other dtypes, devices and amsgrad keep fairseq's step",
          source_has=("exp_avg.mul_(beta1).add_(grad, alpha=1 - beta1)",
                      "exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)",
                      'denom = exp_avg_sq.sqrt().add_(group["eps"])',
                      'step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1',
                      'alpha=-group["weight_decay"] * group["lr"]',
                      "p_data_fp32.addcdiv_(exp_avg, denom, value=-step_size)")),
    Patch("float-targets", "fairseq.trainer.Trainer._fp_convert_sample", "extends",
          "BitFitTrainer (every train.py run with --fp16 or --bf16)",
          "fairseq casts every fp32 tensor of a batch to fp16/bf16, the targets included: a regression task's "
          "scores trained and were scored rounded (STS-B's 3.8 as 3.796875 in bf16), and the GLUE criterion's "
          "metrics could not read bf16 targets at all. The targets keep their dtype; the loss is fp32 either way",
          source_has=("def apply_bfloat16(t):", "sample = utils.apply_to_sample(apply_bfloat16, sample)")),
    Patch("fused-adam", "fairseq.optim.adam.Adam.step", "replaces", "train.py --fused-adam (dense fp32 CPU tensors)",
          "full fine-tuning's optimizer reads and writes every weight about seven times per update; torch's fused "
          "AdamW kernel does it in one pass. It computes fairseq's update (epsilon scaled by the step's bias "
          "correction, so it stays outside it as in fairseq) in another rounding: opt-in, since without it "
          "train.py reproduces fairseq-train exactly",
          source_has=('denom = exp_avg_sq.sqrt().add_(group["eps"])',
                      'step_size = group["lr"] * math.sqrt(bias_correction2) / bias_correction1')),
)


def resolve(target: str):
    """The object a dotted path names: the longest importable module, then attributes."""
    parts = target.split(".")
    for split in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:split]))
        except ImportError:
            continue
        for attribute in parts[split:]:
            obj = getattr(obj, attribute)
        return obj
    raise ImportError(f"cannot import any part of {target}")


_installed: List[str] = []


def installed() -> List[str]:
    """Names of the patches in effect in this process now."""
    return list(_installed)


def _mark(name: str, active: bool = True) -> None:
    if active and name not in _installed:
        _installed.append(name)
    elif not active and name in _installed:
        _installed.remove(name)


# --------------------------------------------------------------------------- install(): always on


def install() -> None:
    """Apply the patches that hold whenever the plugin is loaded (idempotent)."""
    _mark("quiet-import")  # applied when this module imported fairseq
    warnings.filterwarnings("ignore", message=r".*torch\.cuda\.amp\.autocast.*", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true but no accelerator.*")
    _mark("quiet-warnings")
    torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_TYPES)
    _mark("safe-checkpoint-types")
    distributed_utils._broadcast_object_slow = _broadcast_object
    _mark("rank-broadcast")
    for arch in ("bert_base", "bert_large"):
        _claim_arch_name(arch)
    _mark("bert-arch-names")
    numpy2.install()
    _mark("numpy2-compat-long")


def _broadcast_object(obj, src_rank, group, dist_device):
    """Send a Python object from ``src_rank`` to every rank of ``group`` (see PATCHES: rank-broadcast)."""
    objects = [obj]
    torch.distributed.broadcast_object_list(objects, src=src_rank, group=group, device=dist_device)
    return objects[0]


def _claim_arch_name(arch: str) -> None:
    """Take ``arch`` from fairseq's deprecated ``masked_lm`` model, so the plugin's bert can register it."""
    if models.ARCH_MODEL_NAME_REGISTRY.get(arch) != "masked_lm":
        return
    del models.ARCH_MODEL_NAME_REGISTRY[arch], models.ARCH_MODEL_REGISTRY[arch], models.ARCH_CONFIG_REGISTRY[arch]
    models.ARCH_MODEL_INV_REGISTRY["masked_lm"].remove(arch)


# The scoped patches, one module per user, re-exported here; imported last: they mark themselves
# with _mark above.  _new_instance and _contiguous_input keep their old names for pickles made before.
from .attention_projections import attention_through_projections, projections_as_modules  # noqa: E402,F401
from .checkpoint_copies import CopyHook, route_checkpoint_copies  # noqa: E402,F401
from .cuda_memory import cuda_peak_memory  # noqa: E402,F401
from .foreach_adam import ForeachAdam, FusedFairseqAdam, foreach_adam  # noqa: E402,F401
from .generation import ModelLoader, ensemble_in_memory, models_in_memory  # noqa: E402,F401
from .layer_input import _contiguous_input, contiguous_layer_input  # noqa: E402,F401
from .module_walks import CachedModuleWalks, _new_instance, cache_module_walks  # noqa: E402,F401
from .training_loop import (SavedHook, StatsCallback, UpdateHook, fairseq_train_with,  # noqa: E402,F401
                            stop_batch_prefetching)
