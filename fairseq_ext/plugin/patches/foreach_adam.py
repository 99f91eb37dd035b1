"""train.py's Adam on CPU: fairseq's update, one multi-tensor call per operation (see PATCHES: foreach-adam).

fairseq's ``Adam.step`` runs about ten tensor operations from Python for each parameter:
for a BitFit run's hundred small bias tensors that loop, not the arithmetic, is the
optimizer's time.  ``torch._foreach_*`` ops take the whole list in one call; on CPU torch
runs each of them as the same per-tensor kernel in a C++ loop, so the numbers are fairseq's
bit for bit (tests/test_patches.py), full fine-tuning included.

``--fused-adam`` goes further: torch's fused AdamW kernel, one pass over each tensor
instead of about seven, computing fairseq's update (its epsilon outside the bias
correction) in a different rounding: for full fine-tuning, where the optimizer's memory
traffic over every weight is the cost, at the price of fairseq-train's exact numbers.
"""
import math
from collections import defaultdict

import torch
from fairseq.optim.adam import Adam
from torch.optim.adamw import adamw as functional_adamw

from . import _mark


def foreach_adam(optimizer, fused: bool = False) -> bool:
    """Give train.py's fairseq Adam (inside its FairseqAdam, or fp16/bf16 wrapper) the multi-tensor step,
    or with ``fused`` torch's fused kernel; False where it is another optimizer."""
    inner = getattr(optimizer, "optimizer", None)
    if not isinstance(inner, Adam):
        return False
    inner.__class__ = FusedFairseqAdam if fused else ForeachAdam  # same state and groups: fairseq's checkpoints
    _mark("fused-adam" if fused else "foreach-adam")
    return True


def _foreach_ready(p) -> bool:
    """What the multi-tensor path covers: dense fp32 CPU tensors."""
    return not p.grad.is_sparse and p.device.type == "cpu" and p.dtype == p.grad.dtype == torch.float32


class ForeachAdam(Adam):
    """fairseq's Adam with each operation applied to all tensors of a group and step count at once;
    fairseq's own step where a tensor is not dense fp32 on CPU, or with amsgrad."""

    def step(self, closure=None):
        with_grad = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if any(group.get("amsgrad", False) for group in self.param_groups) or \
                not all(_foreach_ready(p) for p in with_grad):
            return super().step(closure)
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            by_step = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p.data)
                    state["exp_avg_sq"] = torch.zeros_like(p.data)
                state["step"] += 1
                by_step[state["step"]].append(p)
            for step, params in by_step.items():
                self._update(group, step, params)
        return loss

    def _update(self, group, step, params):
        # fairseq's operations in fairseq's order (fairseq/optim/adam.py), each over the list.
        beta1, beta2 = group["betas"]
        grads = [p.grad.data for p in params]
        exp_avgs = [self.state[p]["exp_avg"] for p in params]
        exp_avg_sqs = [self.state[p]["exp_avg_sq"] for p in params]
        data = [p.data for p in params]
        torch._foreach_mul_(exp_avgs, beta1)
        torch._foreach_add_(exp_avgs, grads, alpha=1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
        denoms = torch._foreach_sqrt(exp_avg_sqs)
        torch._foreach_add_(denoms, group["eps"])
        step_size = group["lr"] * math.sqrt(1 - beta2 ** step) / (1 - beta1 ** step)
        if group["weight_decay"] != 0:
            torch._foreach_add_(data, data, alpha=-group["weight_decay"] * group["lr"])
        torch._foreach_addcdiv_(data, exp_avgs, denoms, value=-step_size)


class FusedFairseqAdam(ForeachAdam):
    """fairseq's Adam update through torch's fused AdamW kernel (``--fused-adam``): the same formula,
    another rounding.  fairseq divides by sqrt(v) + eps with the step size lr * sqrt(bc2) / bc1; torch
    divides by sqrt(v) / sqrt(bc2) + eps' with lr / bc1, so eps' = eps / sqrt(bc2) gives fairseq's update.
    Weight decay is decoupled in both (p -= lr * wd * p before the step)."""

    def _update(self, group, step, params):
        beta1, beta2 = group["betas"]
        # The kernel adds 1 to each step count before using it: it is handed the count before this step.
        steps = [torch.tensor(float(step - 1)) for _ in params]
        functional_adamw([p.data for p in params], [p.grad.data for p in params],
                         [self.state[p]["exp_avg"] for p in params], [self.state[p]["exp_avg_sq"] for p in params],
                         [], steps, fused=True, amsgrad=False, beta1=beta1, beta2=beta2, lr=group["lr"],
                         weight_decay=group["weight_decay"], eps=group["eps"] / math.sqrt(1 - beta2 ** step),
                         maximize=False)
