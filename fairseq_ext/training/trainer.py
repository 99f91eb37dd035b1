"""BitFit inside fairseq's training loop: a Trainer that freezes the model before
fairseq builds the optimizer.

fairseq builds the optimizer, the fp16/bf16 master copies, gradient clipping
and the DDP wrapper lazily, from ``filter(lambda p: p.requires_grad, ...)``
(trainer.py ``_build_optimizer``), the first time ``load_checkpoint`` or a step
needs them.  Freezing when the Trainer is constructed is therefore enough for
all of them.
"""
import logging
import warnings
from typing import List, Optional

import torch
from fairseq.distributed import LegacyDistributedDataParallel, ModuleProxyWrapper
from fairseq.optim import FairseqOptimizer, lr_scheduler
from fairseq.optim.fp16_optimizer import FP16Optimizer
from fairseq.trainer import Trainer

from ..core import bitfit, controls, tuners
from ..core.errors import UserError
from ..core.run_record import RunRecord
from ..plugin.checkpoints import load_checkpoint_file
from ..plugin.patches import cache_module_walks, contiguous_layer_input, foreach_adam, projections_as_modules
from . import options, stop_rules
from .delta_writer import CheckpointDeltaWriter, check_run

logger = logging.getLogger(__name__)

# train.py resumes a --save-dir's checkpoint_last.pt whatever --reset-optimizer says.
START_ELSEWHERE = ("or start the other selection from this checkpoint in a new --save-dir "
                   "(--restore-file CHECKPOINT --reset-optimizer)")


def _master_copies(optimizer):
    """(parameter, its fp32 master copy as a tensor of the same shape) pairs of fairseq's FP16Optimizer
    (--fp16/--bf16 without --memory-efficient-*); none for other optimizers, which hold no copies."""
    if not isinstance(optimizer, FP16Optimizer):
        return []
    if not optimizer.has_flat_params:
        return [(p, master.data) for p, master in zip(optimizer.fp16_params, optimizer.fp32_params)]
    flat = next(iter(optimizer.fp32_params.values())).data
    pairs, offset = [], 0
    for p in optimizer.fp16_params:
        pairs.append((p, flat[offset:offset + p.numel()].view_as(p)))
        offset += p.numel()
    return pairs


def _probe_sample(task, cfg):
    """A two-example batch from the first loaded validation set, or None."""
    for split in cfg.dataset.valid_subset.split(",") + ["valid"]:
        try:
            dataset = task.dataset(split)
        except KeyError:
            continue
        if len(dataset) > 0:
            return dataset.collater([dataset[i] for i in range(min(2, len(dataset)))])
    return None


class BitFitTrainer(Trainer):
    """fairseq's Trainer, freezing everything but the BitFit selection when ``--bitfit`` is on.

    Without ``--bitfit`` it computes what fairseq's Trainer computes, so train.py
    reproduces fairseq-train exactly; in both cases the model skips fairseq's
    redundant per-update module walks (patches.cache_module_walks).  ``record``
    (the first worker's run record) gets the trained and total parameter counts
    and the selection.
    """

    def __init__(self, cfg, task, model, criterion, quantizer=None, record: Optional[RunRecord] = None):
        bitfit_cfg = cfg.get("bitfit", None)
        self.bitfit_selection: Optional[bitfit.Selection] = None
        self._checking_resumed_selection = False
        self._delta_writer: Optional[CheckpointDeltaWriter] = None
        self._mask_guard: Optional[controls.MaskGuard] = None
        selecting = bitfit_cfg is not None and options.trains_selection(bitfit_cfg)
        if selecting:
            check_run(cfg, task, model)  # a task family BitFit cannot give a delta for stops before anything runs
        # The tuner's modules exist before the module walks are cached and before fairseq loads a checkpoint.
        tuner = options.tuner_spec(bitfit_cfg) if selecting else None
        added = self._inject_tuner(model, tuner) if tuner is not None else {}
        cache_module_walks(model)
        if selecting:
            self.bitfit_selection = self._apply_bitfit(bitfit_cfg, cfg, task, model, criterion, added, tuner)
            contiguous_layer_input(model)
            if self.bitfit_selection.masks:
                self._mask_guard = controls.MaskGuard(model, self.bitfit_selection.masks)
        else:
            logger.info(bitfit.trainable_summary(model))
        if record is not None:
            summary = bitfit.summary(model, self.bitfit_selection) if self.bitfit_selection else None
            record.set_parameters(*bitfit.trained_and_total(model, self.bitfit_selection), bitfit=summary)
        super().__init__(cfg, task, model, criterion, quantizer)

    @staticmethod
    def _inject_tuner(model, tuner: tuners.TunerSpec) -> dict:
        """Add the comparison method's tensors; {name: role} of what it added."""
        try:
            names = tuners.inject(model, tuner)
        except tuners.TunerError as error:
            raise UserError(f"--tuner {tuner.method}: {error}") from None
        projections_as_modules(model)  # a wrapped q/k/v/out projection must not be skipped by the fast path
        return {name: tuners.trained_tensor_role(name) for name in names}

    @staticmethod
    def _apply_bitfit(bitfit_cfg, cfg, task, model, criterion, added=None, tuner=None) -> bitfit.Selection:
        sample = _probe_sample(task, cfg)

        def forward_backward():
            # One real loss on two validation examples shows which selected
            # tensors get a gradient; fork the RNG so training is unaffected.
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                # fairseq's decoders pass torch a float causal mask with a bool padding mask, which torch
                # calls deprecated: a resumed seq2seq run refused at start must print its one error line only.
                warnings.filterwarnings("ignore", message="Support for mismatched key_padding_mask")
                loss, _, _ = criterion(model, sample)
                loss.backward()

        if sample is None:
            logger.warning(
                "BitFit: no validation data to probe which biases the forward pass uses; "
                "every selected tensor stays trainable"
            )
        try:
            selection = bitfit.apply(
                model,
                terms=options.selection_terms(bitfit_cfg),
                train_heads=not bitfit_cfg.bitfit_freeze_heads,
                forward_backward=forward_backward if sample is not None else None,
                seed=cfg.common.seed,
                added=added,
                tuner=tuner.header() if tuner is not None else None,
            )
        except bitfit.SelectionError as error:
            raise UserError(f"--bitfit-terms: {error}") from None
        for line in bitfit.report(model, selection).splitlines():
            logger.info(line)
        return selection

    # -- random-subset controls: only the masked entries of their matrices change ----

    def train_step(self, samples, raise_oom=False):
        if self._mask_guard is not None and self._mask_guard.saved is None:
            self._mask_guard.snapshot()  # the weights this launch starts from, pretrained or resumed
        output = super().train_step(samples, raise_oom)
        if self._mask_guard is not None:
            self._mask_guard.restore(_master_copies(self.optimizer))
        return output

    def _fp_convert_sample(self, sample):
        """fairseq's --fp16/--bf16 cast of a batch's float tensors, but for the targets (PATCHES: float-targets):
        a regression task's scores would train and be scored rounded (STS-B's 3.8 as 3.796875 in bf16)."""
        converted = super()._fp_convert_sample(sample)
        target = sample.get("target") if isinstance(sample, dict) else None
        if converted is not sample and torch.is_tensor(target) and target.is_floating_point():
            converted["target"] = target
        return converted

    # -- distributed: reduce only what is trained ----------------------------------

    @property
    def model(self):
        if self._wrapped_model is None and self.use_distributed_wrapper:
            wrapped = self._build_distributed_wrapper()
            if wrapped is not None:
                self._wrapped_model = wrapped
        return super().model

    def _build_distributed_wrapper(self):
        """The DDP wrapper where fairseq's own does not fit; None to use fairseq's.

        - legacy_ddp: fairseq sizes its all-reduce buffer by the whole model; size it
          by the trained tensors (the same for full fine-tuning).
        - c10d/pytorch_ddp on CPU: fairseq passes ``device_ids=[id]``, which torch
          rejects for CPU modules.
        """
        dt = self.cfg.distributed_training
        trainable = [p for p in self._model.parameters() if p.requires_grad]
        self._log_all_reduce_volume(trainable)
        module = self._model.to(self.device)
        if not trainable:
            return module  # the frozen baseline: no gradient to reduce, and torch's DDP refuses such a module
        if dt.ddp_backend in ("legacy_ddp", "no_c10d"):
            wrapped = LegacyDistributedDataParallel(
                module=module,
                process_group=self.data_parallel_process_group,
                buffer_size=min(2**28, max(1, sum(p.numel() for p in trainable))),
            )
        elif dt.ddp_backend in ("c10d", "pytorch_ddp") and not self.cuda:
            wrapped = torch.nn.parallel.DistributedDataParallel(
                module=module,
                device_ids=None,
                broadcast_buffers=dt.broadcast_buffers,
                bucket_cap_mb=dt.bucket_cap_mb,
                process_group=self.data_parallel_process_group,
                find_unused_parameters=dt.find_unused_parameters,
                gradient_as_bucket_view=dt.gradient_as_bucket_view,
            )
        else:
            return None
        # fairseq reaches model attributes and state_dict through the wrapper.
        return ModuleProxyWrapper(wrapped)

    def _log_all_reduce_volume(self, trainable) -> None:
        if self.data_parallel_rank == 0:
            size = sum(p.numel() * p.element_size() for p in trainable)
            logger.info(
                f"gradient all-reduce per step: {len(trainable)} tensors, {size:,} bytes "
                f"({self.cfg.distributed_training.ddp_backend}, "
                f"{self.data_parallel_world_size} workers)"
            )

    # -- checkpoints: the selection travels with the optimizer state it shapes ------

    def _trainable_names(self) -> List[str]:
        return [name for name, p in self._model.named_parameters() if p.requires_grad]

    def state_dict(self):
        state = super().state_dict()
        if self.bitfit_selection is not None:
            state["optimizer_history"][-1]["bitfit"] = {
                "terms": self.bitfit_selection.terms,
                "train_heads": self.bitfit_selection.train_heads,
                "trainable": self._trainable_names(),
                **({"masks": self._mask_record()} if self.bitfit_selection.masks else {}),
                **({"tuner": self.bitfit_selection.tuner} if self.bitfit_selection.tuner else {}),
            }
        return state

    def _mask_record(self) -> dict:
        """A control's masks as the checkpoint keeps them: the seed, and each matrix's flat indices."""
        return {"seed": self.bitfit_selection.seed,
                "indices": {name: controls.mask_indices(mask) for name, mask in self.bitfit_selection.masks.items()}}

    def load_checkpoint(self, filename, reset_optimizer=False, *args, **kwargs):
        # fairseq rebuilds the optimizer from the checkpoint's history right before
        # loading its state: the check runs there, before any size mismatch can hide.
        self._checking_resumed_selection = not reset_optimizer
        try:
            extra_state = super().load_checkpoint(filename, reset_optimizer, *args, **kwargs)
        except Exception as error:
            if "Cannot load model parameters" in str(error):
                self._explain_other_tuner(filename)
            raise
        finally:
            self._checking_resumed_selection = False
        stop_rules.restore_from(extra_state, reset=reset_optimizer or kwargs.get("reset_meters", False))
        return extra_state

    def _explain_other_tuner(self, filename) -> None:
        """A checkpoint whose tensors do not fit: a sentence when the cause is another --tuner setting."""
        saved = (load_checkpoint_file(filename).get("optimizer_history") or [{}])[-1].get("bitfit") or {}
        ours = self.bitfit_selection.tuner if self.bitfit_selection is not None else None
        theirs = saved.get("tuner")
        if ours != theirs:
            def described(header):
                return tuners.TunerSpec.from_header(header).describe() if header else "no --tuner"
            raise UserError(f"{filename} was trained with {described(theirs)}, this run asks for {described(ours)}; "
                            f"resume with the same --tuner settings, {START_ELSEWHERE}") from None

    def _build_optimizer(self):
        if self._checking_resumed_selection and self._optim_history:
            self._check_resumed_selection(self._optim_history[-1].get("bitfit"))
        if self.bitfit_selection is not None and not self.bitfit_selection.groups:
            self._optimizer = NothingToTrainOptimizer(self.cfg.optimizer, self.cfg.optimization.lr[0])
            self._lr_scheduler = lr_scheduler.build_lr_scheduler(self.cfg.lr_scheduler, self._optimizer)
            self._lr_scheduler.step_update(0)
        else:
            super()._build_optimizer()
            bitfit_cfg = self.cfg.get("bitfit", None)
            # fairseq's numbers, one call per operation; or torch's fused kernel (PATCHES: foreach-adam, fused-adam)
            foreach_adam(self._optimizer, fused=bool(bitfit_cfg is not None and bitfit_cfg.get("fused_adam", False)))
        if self._checking_resumed_selection and self._optim_history:
            self._check_resumed_components(self._optim_history[-1])

    def _check_resumed_components(self, saved) -> None:
        """fairseq asserts these right after; a changed flag deserves a sentence, not a traceback."""
        for what, flag, name in (("optimizer", "--optimizer", type(self.optimizer).__name__),
                                 ("criterion", "--criterion", type(self.get_criterion()).__name__)):
            if saved.get(f"{what}_name", name) != name:
                raise UserError(
                    f"the checkpoint being resumed was trained with the {what} {saved[f'{what}_name']}, this "
                    f"run builds {name}; resume with the same {flag}, {START_ELSEWHERE}")

    def _check_resumed_selection(self, saved) -> None:
        current = self.bitfit_selection
        if saved is None and current is None:
            return
        if saved is None:
            raise UserError(
                "the checkpoint being resumed was trained without --bitfit, so its optimizer "
                f"state covers every parameter; resume without --bitfit, {START_ELSEWHERE}"
            )
        if current is None:
            raise UserError(
                f"the checkpoint being resumed was trained with --bitfit --bitfit-terms "
                f"{saved['terms']!r}; resume with the same --bitfit flags, {START_ELSEWHERE}"
            )
        saved_masks = (saved.get("masks") or {}).get("indices", {})
        masks_differ = set(saved_masks) != set(current.masks) or any(
            not torch.equal(indices, controls.mask_indices(current.masks[name])) for name, indices in saved_masks.items())
        if masks_differ:
            raise UserError(
                f"the checkpoint being resumed trained other weight entries (--bitfit-terms {saved['terms']!r}, "
                f"seed {(saved.get('masks') or {}).get('seed')}) than this run draws (--bitfit-terms "
                f"{current.terms!r}, --seed {current.seed}); resume with the same --seed, {START_ELSEWHERE}")
        if saved["trainable"] != self._trainable_names():
            raise UserError(
                f"the checkpoint being resumed trained {len(saved['trainable'])} tensors "
                f"(--bitfit-terms {saved['terms']!r}, heads "
                f"{'trained' if saved['train_heads'] else 'frozen'}), this run selects "
                f"{len(self._trainable_names())} (--bitfit-terms {current.terms!r}, heads "
                f"{'trained' if current.train_heads else 'frozen'}); use the same selection, "
                f"{START_ELSEWHERE}"
            )

    # -- BitFit deltas: the trained tensors next to every checkpoint ---------------

    def save_checkpoint(self, filename, extra_state):
        """fairseq's save, with early stopping's state (training.stop_rules), plus NAME.delta.safetensors
        beside NAME.pt in BitFit runs (training.delta_writer)."""
        stop_rules.save_into(extra_state)
        if self.bitfit_selection is None:
            return super().save_checkpoint(filename, extra_state)
        if self._delta_writer is None:
            self._delta_writer = CheckpointDeltaWriter(self)
        return self._delta_writer.save(filename, extra_state, super().save_checkpoint)


class NothingToTrainOptimizer(FairseqOptimizer):
    """The optimizer of a BitFit run that trains no parameter: ``--bitfit-terms none`` on a model
    without task heads (a seq2seq model), the frozen baseline.

    fairseq's loop still runs every forward pass, logs the training loss, validates and saves
    checkpoints (and their empty deltas).  torch's optimizers refuse an empty parameter list and
    a loss without a graph cannot go backward: this one holds an empty parameter group, whose
    learning rate the scheduler sets as usual, and its backward does nothing.
    """

    def __init__(self, cfg, lr: float):
        super().__init__(cfg)
        self._optimizer = torch.optim.SGD([{"params": []}], lr=lr)

    def backward(self, loss):
        pass  # no parameter requires grad
