"""A short check of BitFit on this machine's accelerator: one PASS/FAIL line per check.

    bash run_scripts/gpu_check.sh                            # CUDA: fp16, bf16, memory-efficient, amp; NCCL
    python -m fairseq_ext.experiments.gpu_check --device cpu # the same checks that exist on CPU (bf16; gloo)

Each precision check trains a few steps with train.py's Trainer, full fine-tuning
and BitFit: BitFit's frozen weights must stay bit-identical in their training
dtype, its trained tensors must change and keep fp32 optimizer state (fp32 master
copies where fairseq keeps them), and an fp16 loss scale must stay finite. The
data-parallel check trains BitFit under torchrun on every GPU (NCCL; gloo on CPU)
and compares the trained tensors across ranks.
"""
import argparse
import os
import subprocess
import sys
from typing import Dict, List

import torch
from fairseq.distributed import utils as distributed_utils

from ..training.synthetic import build_trainer

CUDA_PRECISIONS = ("fp16", "bf16", "memory-efficient-fp16", "memory-efficient-bf16", "amp")
CPU_PRECISIONS = ("bf16", "memory-efficient-bf16")


def _precision_args(precision: str) -> List[str]:
    return [] if precision == "fp32" else [f"--{precision}"]


def _snapshot(trainer) -> Dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.get_model().named_parameters()}


def _train(model, mode, device, precision, steps, extra=()):
    trainer, data = build_trainer(model, mode, device, batch=8, seq_len=64, precision="fp32",
                                  extra_args=[*_precision_args(precision), "--lr", "1e-3", *extra])
    before = _snapshot(trainer)
    for _ in range(steps):
        trainer.train_step([data.sample])
    return trainer, before


def check_precision(model: str, device: str, precision: str, steps: int) -> List[str]:
    """Problems found with one precision; empty when it passes."""
    problems = []
    full, before = _train(model, "full", device, precision, steps)
    changed = sum(not torch.equal(before[n], p) for n, p in full.get_model().named_parameters())
    if changed == 0:
        problems.append("full fine-tuning changed no weight")

    trainer, before = _train(model, "bitfit-ofa", device, precision, steps)
    training_dtype = {"fp16": torch.float16, "memory-efficient-fp16": torch.float16,
                      "bf16": torch.bfloat16, "memory-efficient-bf16": torch.bfloat16}.get(precision, torch.float32)
    trained = 0
    for name, p in trainer.get_model().named_parameters():
        if p.dtype != training_dtype:
            problems.append(f"{name} is {p.dtype}, not {training_dtype}")
        if p.requires_grad:
            trained += not torch.equal(before[name], p)
        elif not torch.equal(before[name], p):
            problems.append(f"frozen {name} changed")
    if trained == 0:
        problems.append("BitFit changed no trained tensor")
    optimizer = trainer.optimizer
    n_trainable = sum(p.requires_grad for p in trainer.get_model().parameters())
    states = [s for s in optimizer.state_dict().get("state", {}).values() if "exp_avg" in s]
    if len(states) > n_trainable:
        problems.append(f"optimizer state for {len(states)} tensors, {n_trainable} are trained")
    if any(s["exp_avg"].dtype != torch.float32 for s in states):
        problems.append("optimizer state is not fp32")
    masters = getattr(optimizer, "fp32_params", None)
    if precision in ("fp16", "bf16") and masters is None:
        problems.append("no fp32 master copies")
    if masters is not None:
        tensors = masters.values() if isinstance(masters, dict) else masters if isinstance(masters, list) else [masters]
        size = sum(t.numel() for t in tensors)
        wanted = sum(p.numel() for p in trainer.get_model().parameters() if p.requires_grad)
        if size != wanted or any(t.dtype != torch.float32 for t in tensors):
            problems.append(f"fp32 masters hold {size} values, {wanted} are trained")
    scaler = getattr(optimizer, "scaler", None)
    if "fp16" in precision and (scaler is None or not (0 < scaler.loss_scale < float("inf"))):
        problems.append(f"loss scale {getattr(scaler, 'loss_scale', None)}")
    return problems


def ddp_worker(model: str, device: str, steps: int) -> None:
    """One torchrun rank: BitFit with c10d DDP; rank 0 prints PASS/FAIL."""
    extra = ["--ddp-backend", "c10d", "--distributed-world-size", os.environ["WORLD_SIZE"],
             "--distributed-rank", os.environ["RANK"], "--distributed-init-method", "env://",
             "--distributed-no-spawn", "--device-id", os.environ.get("LOCAL_RANK", "0"),
             "--distributed-backend", "nccl" if device == "cuda" else "gloo"]
    trainer, data = build_trainer(model, "bitfit-ofa", device, batch=8, seq_len=64,
                                  precision="fp16" if device == "cuda" else "fp32",
                                  extra_args=extra, distributed=True)
    for _ in range(steps):
        trainer.train_step([data.sample])
    checksum = torch.stack([p.detach().float().sum() for p in trainer.get_model().parameters() if p.requires_grad])
    gathered = [torch.zeros_like(checksum) for _ in range(int(os.environ["WORLD_SIZE"]))]
    torch.distributed.all_gather(gathered, checksum)
    if distributed_utils.get_global_rank() == 0:
        same = all(torch.equal(gathered[0], other) for other in gathered[1:])
        backend = torch.distributed.get_backend()
        print(f"{'PASS' if same else 'FAIL'} data parallel: BitFit on {len(gathered)} workers ({backend}, c10d), "
              f"trained tensors {'identical' if same else 'DIFFER'} across ranks", flush=True)
    # Leave together, and skip interpreter teardown: with gloo a rank intermittently aborts
    # there ("terminate called without an active exception") after the check has passed.
    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def check_ddp(model: str, device: str, steps: int, nproc: int) -> bool:
    # --standalone: torchrun picks a free rendezvous port itself (no race for one).
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "fairseq_ext.experiments.gpu_check", "--ddp-worker", "--device", device, "--model", model,
               "--steps", str(steps)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    verdicts = [line for line in result.stdout.splitlines() if line.startswith(("PASS", "FAIL"))]
    if result.returncode != 0 or not verdicts:
        # The workers' own error lines, not torchrun's ChildFailedError summary.
        errors = [line.strip() for line in result.stderr.splitlines()
                  if ("Error" in line or "terminate called" in line)
                  and "Warning" not in line and "ChildFailedError" not in line] \
            or result.stderr.strip().splitlines()[-1:]
        print(f"FAIL data parallel: torchrun exited {result.returncode}: {errors[-1] if errors else 'no output'}",
              flush=True)
        return False
    print(verdicts[-1], flush=True)
    return verdicts[-1].startswith("PASS")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default=None, help="default: roberta_base on cuda, bert_tiny on cpu")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--nproc", type=int, default=None, help="data-parallel workers (default: every GPU; 2 on cpu)")
    parser.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    model = args.model or ("roberta_base" if args.device == "cuda" else "bert_tiny")
    if args.ddp_worker:
        ddp_worker(model, args.device, args.steps)
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("FAIL no CUDA device")
        return 1
    ok = True
    for precision in CUDA_PRECISIONS if args.device == "cuda" else CPU_PRECISIONS:
        try:
            problems = check_precision(model, args.device, precision, args.steps)
        except Exception as error:  # a check that crashes is a failed check, and the others still run
            problems = [f"{type(error).__name__}: {error}"]
        ok &= not problems
        print(f"{'FAIL' if problems else 'PASS'} --{precision} --bitfit on {args.device} ({model}): "
              + ("; ".join(problems[:3]) if problems else "frozen weights bit-identical, trained tensors fp32 state"),
              flush=True)
    nproc = args.nproc or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if nproc < 2 and args.device == "cuda":
        print("SKIP data parallel: one GPU (NCCL needs two to mean anything)")
    else:
        ok &= check_ddp(model, args.device, args.steps, nproc)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
