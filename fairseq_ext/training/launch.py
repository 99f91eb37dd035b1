"""Fit parsed fairseq-train options to the machine and to the run's history.

Stock fairseq 0.12 misreads three things (docs/fairseq_patches.md, "What train.py
fixes in the options"): under torchrun on CPU it runs N independent single-process
trainings, ``--bf16`` switches on TPU mode everywhere, and a restarted fine-tuning
run (``--restore-file PRETRAINED --reset-*``) starts over from PRETRAINED.
"""
import logging
import os
from typing import Optional

import torch

from ..core.errors import UserError
from ..plugin.checkpoints import check_loads_safely

logger = logging.getLogger(__name__)


def uses_cuda(args) -> bool:
    return torch.cuda.is_available() and not args.cpu and not getattr(args, "tpu", False)


def configure_torchrun(args, world_size_given: bool = False) -> None:
    """Take rank, world size and init method from torchrun's environment.

    fairseq only looks at WORLD_SIZE when its own world size (the CUDA device
    count) is above 1, and then computes ``rank % cuda.device_count()``: on CPU
    that is zero processes, then a ZeroDivisionError.  Explicit
    ``--distributed-init-method`` options are left alone; ``world_size_given``: the user set
    ``--distributed-world-size``, which must then agree with torchrun.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if args.distributed_init_method is not None or world_size <= 1 or "RANK" not in os.environ:
        return
    if world_size_given and args.distributed_world_size != world_size:
        raise UserError(
            f"--distributed-world-size {args.distributed_world_size} contradicts torchrun's "
            f"WORLD_SIZE={world_size}; drop the flag under torchrun"
        )
    args.distributed_world_size = world_size
    args.distributed_rank = int(os.environ["RANK"])
    args.device_id = int(os.environ.get("LOCAL_RANK", "0"))
    args.distributed_init_method = "env://"
    args.distributed_no_spawn = True  # torchrun already started one process per rank
    if not uses_cuda(args) and args.distributed_backend == "nccl":
        args.distributed_backend = "gloo"  # NCCL needs GPUs
    if args.distributed_rank == 0:
        logger.info(
            f"torchrun: {world_size} workers, backend {args.distributed_backend}, "
            f"ddp backend {args.ddp_backend}"
        )


PRECISION_FLAGS = ("--fp16", "--memory-efficient-fp16", "--bf16", "--memory-efficient-bf16")


def reject_conflicting_precision(argv) -> None:
    """--fp16 with --bf16: fairseq's parser dies on it with a traceback about TPUs."""
    given = {flag for flag in argv if flag in PRECISION_FLAGS}
    if given & {"--fp16", "--memory-efficient-fp16"} and given & {"--bf16", "--memory-efficient-bf16"}:
        raise UserError(f"{' and '.join(sorted(given))} exclude each other: pick fp16 or bf16")


def configure_precision(args, tpu_requested: bool = False) -> None:
    """Make --bf16 mean bf16, not TPU (unless ``tpu_requested``: the user gave --tpu), and refuse
    precision flags the device lacks."""
    if args.bf16 and args.tpu and not tpu_requested:
        # fairseq's options.py sets tpu whenever bf16 is on.
        args.tpu = False
    if uses_cuda(args):
        return
    if args.amp:
        raise UserError("--amp needs a CUDA device (on CPU it would silently train in fp32); use --bf16 on CPU")
    if (args.fp16 or args.bf16) and not args.fp16_no_flatten_grads:
        # The flattened fp32 master copy is allocated with torch.cuda; per-tensor copies work on CPU.
        args.fp16_no_flatten_grads = True


# CPU flags of native bf16 arithmetic: where a frozen base in bf16 runs faster than in fp32.
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")


def cpu_native_bf16(cpuinfo: str = "/proc/cpuinfo") -> Optional[str]:
    """The CPU's native bf16 feature (``amx_bf16`` or ``avx512_bf16``), or None: torch's own check where
    it has one, else the kernel's CPU flags."""
    checks = (("amx_bf16", "_is_amx_tile_supported"), ("avx512_bf16", "_is_avx512_bf16_supported"))
    if all(hasattr(torch.cpu, check) for _, check in checks):
        return next((flag for flag, check in checks if getattr(torch.cpu, check)()), None)
    try:
        with open(cpuinfo) as lines:
            flags = set(next((line.split(":", 1)[1].split() for line in lines if line.startswith("flags")), []))
    except OSError:
        return None
    return next((flag for flag in NATIVE_BF16_FLAGS if flag in flags), None)


DEFAULT_RESTORE_FILE = "checkpoint_last.pt"


def resolve_restore_file(args) -> Optional[str]:
    """Fail on a missing or broken --restore-file, and resume an interrupted fine-tuning run.

    Stock fairseq silently trains from random init when --restore-file does not
    exist, and with the RoBERTa GLUE recipe (--restore-file PRETRAINED --reset-*)
    a restarted run starts over from PRETRAINED.  Here, once the run has saved a
    checkpoint_last.pt, a restart continues from it, as --finetune-from-model does.
    Returns the checkpoint this launch resumes, or None for a first launch.
    """
    # fairseq reads checkpoint_last{suffix}.pt when --restore-file is checkpoint_last.pt
    last = os.path.join(args.save_dir, f"checkpoint_last{args.checkpoint_suffix}.pt")
    if args.restore_file == DEFAULT_RESTORE_FILE:
        if not os.path.isfile(last):
            return None
        check_loads_safely(last, "resuming from")
        return last
    if os.path.isfile(last) and os.path.abspath(last) != os.path.abspath(args.restore_file):
        logger.info(f"resuming the interrupted run from {last}; --restore-file {args.restore_file} "
                    "was used on its first launch")
        args.restore_file = DEFAULT_RESTORE_FILE
        args.reset_optimizer = args.reset_lr_scheduler = False
        args.reset_meters = args.reset_dataloader = False
        check_loads_safely(last, "resuming from")
        return last
    if not os.path.isfile(args.restore_file):
        raise UserError(f"--restore-file {args.restore_file}: no such file")
    check_loads_safely(args.restore_file, "--restore-file")
    return last if os.path.abspath(last) == os.path.abspath(args.restore_file) else None
