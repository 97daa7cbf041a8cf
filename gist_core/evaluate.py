"""How a selection is judged: fine-tune on it, then the target's held-out loss (DESIGN.md §7)."""

from dataclasses import dataclass
from typing import Sequence

import torch

from .data import Encoded
from .modeling import attach_lora
from .warmup import LoraTrainConfig, mean_completion_loss, train_lora


@dataclass
class FinetuneSpec:
    lora_r: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.1
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    train: LoraTrainConfig = None  # type: ignore[assignment]


def finetune_and_evaluate(load_base, train: Sequence[Encoded], heldout: Sequence[Encoded], spec: FinetuneSpec,
                          device: torch.device, pad_id: int, log=lambda _: None) -> dict:
    """LoRA fine-tune a fresh copy of the base model on ``train``; held-out mean completion loss.

    ``load_base`` returns a fresh base model, so every compared selection starts
    from the same weights with the same seed and hyperparameters. An empty
    ``train`` evaluates the base model itself (the "no fine-tuning" reference).
    """
    model = load_base()
    before = mean_completion_loss(model, heldout, device, pad_id=pad_id)
    if not train:
        return {"heldout_loss": before, "base_loss": before, "train_examples": 0}
    model = attach_lora(model, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.target_modules,
                        seed=spec.train.seed)
    train_lora(model, list(train), spec.train, device, pad_id=pad_id, log=log)
    after = mean_completion_loss(model, heldout, device, pad_id=pad_id)
    return {"heldout_loss": after, "base_loss": before, "train_examples": len(train)}


def compare_selections(load_base, tokenizer, selections: dict[str, list[list[dict]]],
                       heldout: list[tuple[str, str]], spec: FinetuneSpec, max_length: int,
                       device: torch.device = torch.device("cpu"), log=lambda _: None) -> dict[str, dict]:
    """Fine-tune on each named selection (lists of chat messages) with identical settings; held-out losses.

    An empty selection is the "no fine-tuning" reference (the base model).
    """
    from .data import encode_messages, encode_prompt_completion

    held = [encode_prompt_completion(tokenizer, p, c, max_length) for p, c in heldout]
    held = [e for e in held if e.n_label_tokens > 0]
    if not held:
        raise ValueError("no held-out example has completion tokens; set target_sets.heldout_fraction > 0")
    out = {}
    for name, conversations in selections.items():
        train = [encode_messages(tokenizer, m, max_length) for m in conversations]
        train = [e for e in train if e.n_label_tokens > 0]
        out[name] = finetune_and_evaluate(load_base, train, held, spec, device, tokenizer.pad_token_id, log)
        log(f"{name}: held-out loss {out[name]['heldout_loss']:.4f} after {len(train)} examples")
    return out
