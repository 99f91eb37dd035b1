"""Every change this package makes to fairseq's own behaviour, in one place.

``PATCHES`` lists each one: what it replaces, extends or relies on (a dotted path
into fairseq, or torch), when it is in effect, and why.  ``install()`` applies the
ones that hold whenever the plugin is loaded; train.py calls it, and so does the
plugin's registration (``import fairseq_ext`` or ``--user-dir fairseq_ext``).  The
others are scoped: train.py's Trainer and progress bars while fairseq's training
loop runs (``fairseq_train_with``), the delta-following checkpoint copies of BitFit
runs (``route_checkpoint_copies``), the cached module walks of each trained model
(``cache_module_walks``), and the benchmark's CUDA peak counter.

Each patch was checked against ``CHECKED_AGAINST``.  ``tests/test_patches.py``
checks that every target still exists in the installed fairseq, with the shape
each patch assumes, so an upgrade fails loudly instead of silently changing what
a run does.  docs/fairseq_patches.md explains each one for a reader.
"""
import contextlib
import functools
import importlib
import logging
import queue
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import nn


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


with quiet_fairseq_import():
    from fairseq import checkpoint_utils, models
    from fairseq.data import iterators
    from fairseq.distributed import utils as distributed_utils
    from fairseq.logging import progress_bar
    from fairseq.models import BaseFairseqModel, FairseqEncoder

from ...core import interrupts
from ..checkpoints import FAIRSEQ_CHECKPOINT_TYPES

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
    Patch("attention-through-projections", "fairseq.modules.multihead_attention.MultiheadAttention.forward",
          "replaces", "attention_through_projections() (the predictor's mixed-task batches)",
          "fairseq's attention hands its q/k/v/out biases to torch's multi_head_attention_forward, where no hook "
          "can reach them; for the block, eval-mode self-attention runs its q/k/v/out projection modules and "
          "torch's scaled_dot_product_attention, as that function does, and anything else fairseq's own path "
          "that calls the projection modules (skip_embed_dim_check)",
          source_has=("and not self.skip_embed_dim_check", "F.multi_head_attention_forward(",
                      "use_separate_proj_weight=True", "q = self.q_proj(query)", "q *= self.scaling",
                      "attn = self.out_proj(attn)")),
    Patch("cuda-peak-memory", "torch.cuda.reset_peak_memory_stats", "extends", "cuda_peak_memory() (benchmark)",
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


# --------------------------------------------------------------------------- train.py: fairseq's loop, our Trainer


StatsCallback = Callable[[str, Optional[int], Dict[str, object]], None]  # (tag, epoch, stats)


class _RecordedProgressBar(progress_bar.BaseProgressBar):
    """A fairseq progress bar that also hands each printed stats dict to a callback.

    The epoch is the one the bar was made for: fairseq's tensorboard, wandb, aim and
    azureml wrappers do not carry it themselves.
    """

    def __init__(self, wrapped_bar, epoch: Optional[int], on_stats: StatsCallback):
        self.wrapped_bar = wrapped_bar
        self.epoch = epoch
        self.on_stats = on_stats

    def __iter__(self):
        return iter(self.wrapped_bar)

    def __getattr__(self, name):
        return getattr(self.wrapped_bar, name)

    def log(self, stats, tag=None, step=None):
        self.wrapped_bar.log(stats, tag=tag, step=step)

    def print(self, stats, tag=None, step=None):
        self.wrapped_bar.print(stats, tag=tag, step=step)
        self.on_stats(tag, self.epoch, stats)

    def update_config(self, config):
        self.wrapped_bar.update_config(config)


# after_update(cfg, trainer, epoch_itr, end_of_epoch, should_stop), once per update.
UpdateHook = Callable[[object, object, object, bool, bool], None]
# on_saved(trainer, the checkpoint this rank wrote or None), after each checkpoint save.
SavedHook = Callable[[object, Optional[str]], None]


class _WholeCheckpointSaves:
    """fairseq's checkpoint_utils.save_checkpoint with stop signals held back while it writes, then ``on_saved``.

    fairseq stores the best score as ``save_checkpoint.best`` (read and written through
    the module's global name), so attributes go to the wrapped function.
    """

    def __init__(self, save_checkpoint, on_saved: Optional[SavedHook]):
        object.__setattr__(self, "_save", save_checkpoint)
        object.__setattr__(self, "_on_saved", on_saved)

    def __call__(self, checkpoint_cfg, trainer, epoch_itr, val_loss):
        with interrupts.deferred():
            saved = self._save(checkpoint_cfg, trainer, epoch_itr, val_loss)
        if self._on_saved is not None:
            self._on_saved(trainer, saved)
        return saved

    def __getattr__(self, name):
        return getattr(self._save, name)

    def __setattr__(self, name, value):
        setattr(self._save, name, value)

    def __delattr__(self, name):
        delattr(self._save, name)


@contextlib.contextmanager
def fairseq_train_with(trainer_factory, on_stats: Optional[StatsCallback] = None,
                       after_update: Optional[UpdateHook] = None, on_saved: Optional[SavedHook] = None,
                       ended: Optional[Callable[[object], bool]] = None):
    """While the block runs, fairseq_cli.train.main builds ``trainer_factory(cfg, task, model,
    criterion, quantizer)`` instead of fairseq's Trainer; (with ``on_stats``) its progress
    bars hand every stats dict they print to ``on_stats(tag, epoch, stats)``; ``after_update``
    runs after each update's validate-and-save; checkpoints are written whole whatever signal
    arrives, and ``on_saved(trainer, path)`` runs after each save on every rank (path: what this
    rank wrote, or None); once ``ended(cfg)`` holds (a resumed run that had already stopped early), no
    further epoch trains."""
    # Imported here, not with the plugin: its import sets up fairseq-train's logging (INFO on stdout).
    import fairseq_cli.train

    original_trainer, original_bar = fairseq_cli.train.Trainer, progress_bar.progress_bar
    original_validate_and_save = fairseq_cli.train.validate_and_save
    original_train_epoch = fairseq_cli.train.train
    original_save = checkpoint_utils.save_checkpoint

    def recorded_progress_bar(iterator, *args, epoch: Optional[int] = None, **kwargs):
        return _RecordedProgressBar(original_bar(iterator, *args, epoch=epoch, **kwargs), epoch, on_stats)

    def validate_and_save_then_hook(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch):
        valid_losses, should_stop = original_validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets,
                                                               end_of_epoch)
        after_update(cfg, trainer, epoch_itr, end_of_epoch, should_stop)
        return valid_losses, should_stop

    def train_epoch_unless_ended(cfg, trainer, task, epoch_itr):
        if ended(cfg):
            logger.info(f"the resumed checkpoint was saved after --patience {cfg.checkpoint.patience} had run "
                        "out: nothing left to train")
            return [None], True
        return original_train_epoch(cfg, trainer, task, epoch_itr)

    fairseq_cli.train.Trainer = trainer_factory
    _mark("bitfit-trainer")
    if ended is not None:
        fairseq_cli.train.train = train_epoch_unless_ended
        _mark("patience-state")
    checkpoint_utils.save_checkpoint = _WholeCheckpointSaves(original_save, on_saved)
    _mark("whole-checkpoints")
    if on_stats is not None:
        progress_bar.progress_bar = recorded_progress_bar
        _mark("recorded-progress-bars")
    if after_update is not None:
        fairseq_cli.train.validate_and_save = validate_and_save_then_hook
        _mark("update-hooks")
    try:
        yield
    finally:
        fairseq_cli.train.Trainer, progress_bar.progress_bar = original_trainer, original_bar
        fairseq_cli.train.validate_and_save = original_validate_and_save
        fairseq_cli.train.train = original_train_epoch
        checkpoint_utils.save_checkpoint = original_save
        for name in ("bitfit-trainer", "recorded-progress-bars", "update-hooks", "whole-checkpoints", "patience-state"):
            _mark(name, False)


def stop_batch_prefetching(timeout_s: float = 10.0) -> None:
    """End fairseq's batch-prefetching threads (see PATCHES: stop-batch-prefetching).

    Each stops after the batch it is making: its length limit is set to what it has
    made, and its queue is emptied until the thread has put its end marker and left.
    Call it when nothing reads the batches any more.
    """
    for thread in threading.enumerate():
        if not isinstance(thread, iterators.BackgroundConsumer):
            continue
        thread._max_len = 0  # checked after each batch it puts
        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                while True:
                    thread._queue.get_nowait()
            thread.join(0.05)
        if thread.is_alive():
            logger.warning(f"fairseq's batch-prefetching thread {thread.name} did not stop within {timeout_s:g} s")


# --------------------------------------------------------------------------- BitFit runs: deltas follow checkpoint copies


CopyHook = Callable[[str, str, bool, Callable[[str, str, bool], bool]], bool]
_copy_hook: Optional[CopyHook] = None


def route_checkpoint_copies(hook: CopyHook) -> None:
    """fairseq's copies of a saved checkpoint to its other names go through
    ``hook(src, dst, overwrite, copy_file)``, with fairseq's own copy as ``copy_file``.
    The latest hook wins: one training run saves at a time in a process."""
    global _copy_hook
    _copy_hook = hook
    if getattr(checkpoint_utils.PathManager, "routes_copies", False):
        return
    fairseq_path_manager = checkpoint_utils.PathManager

    class RoutedPathManager(fairseq_path_manager):
        routes_copies = True

        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if _copy_hook is None:
                return fairseq_path_manager.copy(src_path, dst_path, overwrite)
            return _copy_hook(src_path, dst_path, overwrite, fairseq_path_manager.copy)

    checkpoint_utils.PathManager = RoutedPathManager
    _mark("delta-following-copies")


# --------------------------------------------------------------------------- every train.py model: cached module walks


# set_num_updates implementations that only pass the count on to descendants.
_FORWARDING = {BaseFairseqModel.set_num_updates, FairseqEncoder.set_num_updates}
# What a model caches about its own tree; never pickled or copied.
_CACHE_KEYS = ("_walked_mode", "_update_count_receivers")


def _update_count_receivers(model: nn.Module) -> List[nn.Module]:
    """The modules below ``model`` with a set_num_updates of their own (not a forwarding one)."""
    receivers = []
    for module in model.modules():
        if module is model or not hasattr(module, "set_num_updates"):
            continue
        if getattr(type(module), "set_num_updates", None) not in _FORWARDING:
            receivers.append(module)
    return receivers


def _new_instance(cls):
    return cls.__new__(cls)


class CachedModuleWalks:
    """Mixin for a fairseq model: ``train``/``eval`` and ``set_num_updates`` without redundant walks.

    Every update, fairseq calls ``model.train()`` twice (Trainer.train_step and
    FairseqTask.train_step) and ``model.set_num_updates(n)``, which BaseFairseqModel
    calls on every module that has it, and FairseqEncoder's version walks its subtree
    again: quadratic in nested encoders (RoBERTa's).  The model here walks only when
    its mode really changes and sends the update count straight to the modules that
    use it; the result is the same.  A caller that switches a submodule's mode
    directly (``model.encoder.eval()``) must call ``model.train()``/``eval()`` on the
    model itself afterwards, as fairseq always does.
    """

    def train(self, mode: bool = True):
        if self.__dict__.get("_walked_mode") is mode:
            return self
        super().train(mode)
        # The tree may have grown since the last walk (heads registered by a checkpoint load).
        self.__dict__["_update_count_receivers"] = _update_count_receivers(self)
        self.__dict__["_walked_mode"] = mode
        return self

    def set_num_updates(self, num_updates):
        receivers = self.__dict__.get("_update_count_receivers")
        if receivers is None:
            receivers = self.__dict__["_update_count_receivers"] = _update_count_receivers(self)
        for module in receivers:
            module.set_num_updates(num_updates)

    def load_state_dict(self, *args, **kwargs):
        for key in _CACHE_KEYS:  # a load may add modules: walk again next time
            self.__dict__.pop(key, None)
        return super().load_state_dict(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # Pickle and deep-copy as the plain fairseq class (the subclass is made at run time
        # and cannot be found by name); the copy walks as fairseq does.
        reduced = list(super().__reduce_ex__(protocol))
        reduced[0], reduced[1] = _new_instance, (_PLAIN_CLASS[type(self)],)
        reduced[2] = {k: v for k, v in reduced[2].items() if k not in _CACHE_KEYS}
        return tuple(reduced)


_SUBCLASSES: Dict[type, type] = {}  # fairseq model class -> its CachedModuleWalks subclass
_PLAIN_CLASS: Dict[type, type] = {}  # and back


def cache_module_walks(model: nn.Module) -> nn.Module:
    """Switch a fairseq model (in place) to its CachedModuleWalks subclass; returns it.

    Models that are not BaseFairseqModel are left alone: their set_num_updates
    semantics are unknown.
    """
    cls = type(model)
    if not isinstance(model, BaseFairseqModel) or isinstance(model, CachedModuleWalks):
        return model
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (CachedModuleWalks, cls),
                                {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _PLAIN_CLASS[_SUBCLASSES[cls]] = cls
    model.__class__ = _SUBCLASSES[cls]
    _mark("cached-module-walks")
    return model


# --------------------------------------------------------------------------- the predictor: attention through its modules


@contextlib.contextmanager
def attention_through_projections(attention_modules):
    """While the block runs, each of fairseq's MultiheadAttention modules given computes with its
    q/k/v/out projection modules, so forward hooks on them see every projection (see PATCHES)."""
    attention_modules = list(attention_modules)
    before = [(module.skip_embed_dim_check, module.__dict__.get("forward")) for module in attention_modules]
    for module in attention_modules:
        module.skip_embed_dim_check = True  # fairseq's own path, for what the fast one below does not cover
        module.forward = functools.partial(_attention_through_projections, module, module.forward)
    try:
        yield
    finally:
        for module, (skip, forward) in zip(attention_modules, before):
            module.skip_embed_dim_check = skip
            if forward is None:
                del module.forward  # back to the class's forward
            else:
                module.forward = forward


def _attention_through_projections(module, fairseq_forward, query, key=None, value=None, key_padding_mask=None,
                                   incremental_state=None, need_weights=True, static_kv=False, attn_mask=None,
                                   before_softmax=False, need_head_weights=False):
    """Eval-mode attention as torch's multi_head_attention_forward computes it without weights
    (three projections, scaled_dot_product_attention, the output projection), through the modules."""
    if (module.training or module.dropout_module.apply_during_inference or incremental_state is not None
            or static_kv or before_softmax or need_weights or need_head_weights or attn_mask is not None
            or module.bias_k is not None or module.add_zero_attn or key is None or value is None):
        return fairseq_forward(query, key, value, key_padding_mask=key_padding_mask,
                               incremental_state=incremental_state, need_weights=need_weights, static_kv=static_kv,
                               attn_mask=attn_mask, before_softmax=before_softmax,
                               need_head_weights=need_head_weights)
    target_length, batch, embed_dim = query.shape

    def heads(x):  # (T, B, C) -> (B, heads, T, head_dim)
        return x.view(x.shape[0], batch, module.num_heads, module.head_dim).permute(1, 2, 0, 3)

    mask = None
    if key_padding_mask is not None:
        mask = ~key_padding_mask.bool().view(batch, 1, 1, -1)  # True: attend
    attention = torch.nn.functional.scaled_dot_product_attention(
        heads(module.q_proj(query)), heads(module.k_proj(key)), heads(module.v_proj(value)), attn_mask=mask)
    attention = attention.permute(2, 0, 1, 3).reshape(target_length, batch, embed_dim)
    return module.out_proj(attention), None


# --------------------------------------------------------------------------- the benchmark: CUDA peaks fairseq resets


class cuda_peak_memory:
    """The most CUDA memory allocated at any moment inside the block (``.peak``, bytes).

    fairseq's train_step reads and resets the CUDA peak after every update (its
    gb_free stat): each peak is recorded just before it is reset.  What an earlier
    run in the same process left allocated for good (cuBLAS's workspace) counts in
    every run alike, as it does in a fresh process once the first matmul has run.
    """

    def __enter__(self):
        self._peaks = []
        self._reset = torch.cuda.reset_peak_memory_stats
        self._reset()

        def record_then_reset(*args, **kwargs):
            self._peaks.append(torch.cuda.max_memory_allocated())
            self._reset(*args, **kwargs)

        torch.cuda.reset_peak_memory_stats = record_then_reset
        _mark("cuda-peak-memory")
        return self

    def __exit__(self, *exc):
        torch.cuda.reset_peak_memory_stats = self._reset
        _mark("cuda-peak-memory", False)
        self.peak = max(self._peaks + [torch.cuda.max_memory_allocated()])
        return False


# --------------------------------------------------------------------------- generation: models already in memory


ModelLoader = Callable[[Optional[dict], object], Tuple[list, object]]  # (arg_overrides, task) -> (models, cfg)


@contextlib.contextmanager
def models_in_memory(loaders: Dict[str, ModelLoader]):
    """While the block runs, fairseq's ``checkpoint_utils.load_model_ensemble`` asked for one path
    that ``loaders`` names returns ``loaders[path](arg_overrides, task)``, a ``(models, cfg)`` pair
    built in memory, instead of reading the file (see PATCHES: models-in-memory); any other path
    loads as fairseq loads it."""
    fairseq_load = checkpoint_utils.load_model_ensemble

    def load_model_ensemble(filenames, arg_overrides=None, task=None, *args, **kwargs):
        if len(filenames) == 1 and filenames[0] in loaders:
            return loaders[filenames[0]](arg_overrides, task)
        return fairseq_load(filenames, arg_overrides, task, *args, **kwargs)

    checkpoint_utils.load_model_ensemble = load_model_ensemble
    _mark("models-in-memory")
    try:
        yield
    finally:
        checkpoint_utils.load_model_ensemble = fairseq_load
        _mark("models-in-memory", False)


# --------------------------------------------------------------------------- BitFit runs: a contiguous first-layer input


def contiguous_layer_input(model: nn.Module) -> int:
    """Give the first layer of every fairseq TransformerEncoder a contiguous input (see PATCHES:
    contiguous-layer-input); returns how many encoders were changed."""
    from fairseq.models.transformer import TransformerEncoderBase

    changed = 0
    for module in model.modules():
        if isinstance(module, TransformerEncoderBase) and len(module.layers) > 0:
            first = module.layers[0]
            if _contiguous_input not in first._forward_pre_hooks.values():
                first.register_forward_pre_hook(_contiguous_input)
                changed += 1
    if changed:
        _mark("contiguous-layer-input")
    return changed


def _contiguous_input(layer, args):
    """A forward pre-hook (module-level: models stay picklable): the layer's input x, made contiguous."""
    return (args[0].contiguous(), *args[1:]) if args and not args[0].is_contiguous() else None
