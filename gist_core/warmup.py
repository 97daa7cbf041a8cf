"""LoRA training: the GIST/LESS warmup, and short fine-tunes for evaluation.

A plain torch loop (AdamW, linear schedule with warmup, gradient accumulation
to an effective batch size), kept short enough to read. Each epoch can be saved
as a standard PEFT adapter directory plus the Adam moments as safetensors,
which the LESS baseline needs to precondition candidate gradients.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .data import Encoded
from .gradients import autocast_for
from .modeling import causal_lm_batches, seed_everything

# Share of the optimizer steps the learning rate ramps up over (warmup and evaluation fine-tunes).
WARMUP_RATIO = 0.03


@dataclass
class LoraTrainConfig:
    epochs: int
    learning_rate: float
    effective_batch_size: int
    micro_batch_size: int
    warmup_ratio: float = WARMUP_RATIO
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    epoch_avg_lr: list[float] = field(default_factory=list)
    steps: int = 0
    seconds: float = 0.0


def linear_schedule(total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """Linear warmup then linear decay to zero (the HF ``get_linear_schedule_with_warmup``)."""
    warmup = math.ceil(total_steps * warmup_ratio)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup  # never zero, so the first step moves
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return factor


def train_lora(
    model: nn.Module,
    encoded: Sequence[Encoded],
    cfg: LoraTrainConfig,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    pad_id: int = 0,
    on_epoch_end: Callable[[int, float, torch.optim.Optimizer], None] | None = None,
    log: Callable[[str], None] = print,
) -> TrainResult:
    """Train the trainable (LoRA) parameters; the loss is the token mean over each micro-batch."""
    if not encoded:
        raise ValueError("no training examples")
    seed_everything(cfg.seed)
    rng = random.Random(cfg.seed)
    accum = max(1, cfg.effective_batch_size // cfg.micro_batch_size)
    micro_per_epoch = math.ceil(len(encoded) / cfg.micro_batch_size)
    steps_per_epoch = math.ceil(micro_per_epoch / accum)
    total = steps_per_epoch * cfg.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_schedule(total, cfg.warmup_ratio))
    result = TrainResult()
    start = time.perf_counter()
    model.train()
    for epoch in range(cfg.epochs):
        lrs: list[float] = []
        group_loss = 0.0
        batches = list(causal_lm_batches(encoded, cfg.micro_batch_size, rng, pad_id))
        for i, (ids, mask, labels) in enumerate(batches):
            with autocast_for(device, dtype):
                out = model(input_ids=ids.to(device), attention_mask=mask.to(device), labels=labels.to(device))
            # Scale by the number of micro-batches in this accumulation group.
            group = min(accum, len(batches) - (i // accum) * accum)
            (out.loss / group).backward()
            group_loss += out.loss.item() / group
            if (i + 1) % accum == 0 or i + 1 == len(batches):
                result.losses.append(group_loss)
                group_loss = 0.0
                lrs.append(opt.param_groups[0]["lr"])
                nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                result.steps += 1
        result.epoch_avg_lr.append(sum(lrs) / len(lrs))
        log(
            f"epoch {epoch + 1}/{cfg.epochs}: {result.steps}/{total} steps, last loss "
            f"{result.losses[-1]:.4f}, avg lr {result.epoch_avg_lr[-1]:.3g}, "
            f"{time.perf_counter() - start:.1f}s"
        )
        if on_epoch_end is not None:
            on_epoch_end(epoch, result.epoch_avg_lr[-1], opt)
    model.eval()
    result.seconds = time.perf_counter() - start
    return result


def adam_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The Adam moments LESS preconditions with, keyed ``<parameter name>::exp_avg`` / ``::exp_avg_sq``
    (float32, CPU), and the optimizer's settings (step, betas, eps, weight decay)."""
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    tensors: dict[str, torch.Tensor] = {}
    step = 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            if not state:
                continue
            name = names[id(p)]
            tensors[f"{name}::exp_avg"] = state["exp_avg"].detach().float().cpu().contiguous()
            tensors[f"{name}::exp_avg_sq"] = state["exp_avg_sq"].detach().float().cpu().contiguous()
            step = int(state["step"])
    g = optimizer.param_groups[0]
    info = {"adam_step": step, "betas": list(g["betas"]), "adam_eps": g["eps"], "weight_decay": g["weight_decay"]}
    return tensors, info


@torch.no_grad()
def mean_completion_loss(
    model: nn.Module, encoded: Sequence[Encoded], device: torch.device, batch_size: int = 32, pad_id: int = 0
) -> float:
    """Mean over examples of each example's mean completion-token loss."""
    from .gradients import per_example_loss

    model.eval()
    total, count = 0.0, 0
    for start in range(0, len(encoded), batch_size):
        chunk = encoded[start : start + batch_size]
        ids, mask, labels = next(causal_lm_batches(chunk, len(chunk), _NoShuffle(), pad_id))
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
        losses = per_example_loss(logits, labels.to(device))
        total += float(losses.sum())
        count += len(chunk)
    return total / count


class _NoShuffle:
    def shuffle(self, _):
        pass
