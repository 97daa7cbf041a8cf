"""How a selection is judged: fine-tune on it, then the target's held-out loss and accuracy.

Two measures on a target's held-out examples (never used to build the basis):

* **held-out loss**: the mean over examples of each example's mean completion-token
  cross-entropy (the same loss GIST takes gradients of);
* **accuracy**, for multiple-choice targets only (MMLU-style completions " A", " B", ...):
  the model's log-probability of every option completion after the prompt, the argmax
  is its answer. A target is multiple choice when every completion, stripped, is one
  capital letter A-J; the options are A up to the largest letter seen (at least A-D).
  Each option is tokenized exactly as the completion is (the same whitespace around
  the letter, through ``encode_prompt_completion``). Other targets get ``None``.

One fine-tune can be judged on several targets' held-out sets at once
(``finetune_and_evaluate_many``): a reference such as "the whole pool" does not
depend on the target, so it is trained once.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .data import IGNORE_INDEX, Encoded, encode_prompt_completion
from .gradients import MAX_BATCH_TOKENS, autocast_for, length_batches
from .modeling import LORA_DROPOUT, attach_lora
from .warmup import LoraTrainConfig, train_lora

LETTERS = "ABCDEFGHIJ"
MIN_OPTIONS = 4  # A-D at least, as MMLU


@dataclass
class FinetuneSpec:
    lora_r: int
    lora_alpha: int
    target_modules: tuple[str, ...]
    train: LoraTrainConfig
    lora_dropout: float = LORA_DROPOUT


# ------------------------------------------------------------ multiple choice


def multiple_choice_options(completions: Sequence[str]) -> list[str] | None:
    """The option letters when every completion, stripped, is one capital letter A-J; else None."""
    stripped = [c.strip() for c in completions]
    if not stripped or not all(len(s) == 1 and s in LETTERS for s in stripped):
        return None
    last = max(LETTERS.index(s) for s in stripped)
    return list(LETTERS[: max(last + 1, MIN_OPTIONS)])


def option_completion(completion: str, letter: str) -> str:
    """``completion`` with its answer letter replaced by ``letter``, whitespace kept (" A" -> " B")."""
    core = completion.strip()
    i = completion.index(core)
    return completion[:i] + letter + completion[i + len(core) :]


@dataclass
class HeldoutSet:
    """A target's held-out examples, encoded once for every model judged on them."""

    encoded: list[Encoded]  # for the loss (completion tokens only)
    options: list[str] | None = None  # multiple-choice letters, or None
    option_encoded: list[list[Encoded]] = field(default_factory=list)  # per example, per option
    answers: list[int] = field(default_factory=list)  # index of the correct option
    dropped: int = 0  # examples without completion tokens

    @property
    def is_multiple_choice(self) -> bool:
        return self.options is not None

    def __len__(self) -> int:
        return len(self.encoded)


def prepare_heldout(
    tokenizer,
    prompts: Sequence[str],
    completions: Sequence[str],
    max_length: int,
    name: str = "target",
    chat_format: str = "tulu",
) -> HeldoutSet:
    """Encode held-out examples (and, for a multiple-choice target, every option of each).

    Examples whose completion is truncated away are dropped (and counted);
    raises ValueError when none is left.
    """
    if len(prompts) != len(completions):
        raise ValueError("prompts and completions differ in length")
    options = multiple_choice_options(completions)
    held = HeldoutSet(encoded=[], options=options)
    for prompt, completion in zip(prompts, completions, strict=False):
        enc = encode_prompt_completion(tokenizer, prompt, completion, max_length, chat_format)
        if enc.n_label_tokens == 0:
            held.dropped += 1
            continue
        held.encoded.append(enc)
        if options is not None:
            held.option_encoded.append(
                [
                    encode_prompt_completion(
                        tokenizer, prompt, option_completion(completion, letter), max_length, chat_format
                    )
                    for letter in options
                ]
            )
            held.answers.append(options.index(completion.strip()))
    if not held.encoded:
        raise ValueError(
            f"{name}: no held-out example has completion tokens (there are {len(prompts)} held-out "
            "examples); set target_sets.heldout_fraction > 0 so some examples judge the selections"
        )
    return held


@torch.no_grad()
def completion_scores(
    model: nn.Module,
    encoded: Sequence[Encoded],
    device: torch.device,
    pad_id: int = 0,
    dtype: torch.dtype = torch.float32,
    max_tokens: int = MAX_BATCH_TOKENS,
    max_batch_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """Per example: (mean completion-token loss, summed completion log-probability).

    Examples with no completion tokens get (nan, -inf). Batches are length-sorted
    under a token budget, so long prompts do not blow up the logits' memory.
    """
    model.eval()
    mean_loss = np.full(len(encoded), np.nan)
    sum_logp = np.full(len(encoded), -np.inf)
    for batch in length_batches(encoded, max_tokens, max_batch_size, pad_id):
        with autocast_for(device, dtype):
            logits = model(input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)).logits
        labels = batch.labels[:, 1:].to(device)
        mask = labels != IGNORE_INDEX
        rows = mask.nonzero(as_tuple=True)
        # Only the label positions: (M, V) log-softmax, not (B, T, V).
        logp = torch.log_softmax(logits[:, :-1][rows].float(), dim=-1)
        tok = logp.gather(-1, labels[rows].unsqueeze(-1)).squeeze(-1)
        sums = torch.zeros(labels.shape[0], device=device, dtype=torch.float64)
        sums.index_add_(0, rows[0], tok.double())
        counts = mask.sum(dim=1)
        for r, i in enumerate(batch.indices):
            if int(counts[r]) > 0:
                sum_logp[i] = float(sums[r])
                mean_loss[i] = -float(sums[r]) / int(counts[r])
    return mean_loss, sum_logp


def option_log_probs(
    model: nn.Module,
    held: HeldoutSet,
    device: torch.device,
    pad_id: int = 0,
    dtype: torch.dtype = torch.float32,
    max_tokens: int = MAX_BATCH_TOKENS,
) -> np.ndarray:
    """(examples, options): log P(option completion | prompt), summed over its tokens."""
    if held.options is None:  # not held.is_multiple_choice
        raise ValueError("not a multiple-choice held-out set")
    n_opt = len(held.options)
    flat = [e for per in held.option_encoded for e in per]
    _, sum_logp = completion_scores(model, flat, device, pad_id, dtype, max_tokens)
    return sum_logp.reshape(len(held.option_encoded), n_opt)


def multiple_choice_accuracy(logp: np.ndarray, answers: Sequence[int]) -> float:
    """Share of examples whose highest-scoring option is the answer (ties: the first option)."""
    predicted = np.argmax(logp, axis=1)
    return float(np.mean(predicted == np.asarray(answers)))


def evaluate_heldout(
    model: nn.Module,
    held: HeldoutSet,
    device: torch.device,
    pad_id: int = 0,
    dtype: torch.dtype = torch.float32,
    max_tokens: int = MAX_BATCH_TOKENS,
) -> dict:
    """{"heldout_loss", "accuracy" (None unless multiple choice), "heldout_examples"}."""
    mean_loss, _ = completion_scores(model, held.encoded, device, pad_id, dtype, max_tokens)
    accuracy = None
    if held.is_multiple_choice:
        accuracy = multiple_choice_accuracy(
            option_log_probs(model, held, device, pad_id, dtype, max_tokens), held.answers
        )
    return {"heldout_loss": float(np.mean(mean_loss)), "accuracy": accuracy, "heldout_examples": len(held)}


# ------------------------------------------------------------------ fine-tune


def finetune_and_evaluate_many(
    load_base: Callable[[], nn.Module],
    train: Sequence[Encoded],
    heldouts: Mapping[str, HeldoutSet],
    spec: FinetuneSpec,
    device: torch.device,
    pad_id: int,
    dtype: torch.dtype = torch.float32,
    max_tokens: int = MAX_BATCH_TOKENS,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, dict]:
    """One LoRA fine-tune of a fresh base model on ``train``, judged on every held-out set.

    ``load_base`` returns a fresh base model, so every compared selection starts
    from the same weights with the same seed and hyperparameters. An empty
    ``train`` evaluates the base model itself (the "no fine-tuning" reference).
    Returns {name: {"heldout_loss", "accuracy", "heldout_examples", "train_examples",
    "train_seconds"}}.
    """
    model = load_base()
    seconds = 0.0
    if train:
        model = attach_lora(
            model, spec.lora_r, spec.lora_alpha, spec.lora_dropout, spec.target_modules, seed=spec.train.seed
        )
        start = time.perf_counter()
        train_lora(model, list(train), spec.train, device, dtype=dtype, pad_id=pad_id, log=log)
        seconds = time.perf_counter() - start
    out = {
        name: {
            **evaluate_heldout(model, held, device, pad_id, dtype, max_tokens),
            "train_examples": len(train),
            "train_seconds": seconds,
        }
        for name, held in heldouts.items()
    }
    del model
    return out
