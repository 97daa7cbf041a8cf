"""Exact per-example LoRA gradients, computed a batch at a time.

For a linear map y = x W^T the gradient of a loss with respect to W is
sum_t dL/dy_t (outer) x_t. Forward hooks on every trainable linear layer (the
LoRA ``lora_A``/``lora_B`` layers) keep each layer's input x and output y;
one ``torch.autograd.grad`` call returns dL/dy for all of them at once, and a
batched matmul gives the per-example weight gradients. Each example's loss is
its own mean over its completion tokens, and the examples do not interact in
eval mode, so each row equals the batch-size-1 gradient exactly.

The flattened gradient vector (dimension D) is the concatenation of the
trainable parameters in ``named_parameters`` order, each flattened row-major:
the same order a plain ``torch.cat([p.grad.flatten() ...])`` gives.

Two savings a plain training step does not make: the output layer runs only on
the positions that carry a completion token (prompt positions have no loss), and
with ``gradient_checkpointing`` each decoder layer keeps only its inputs and
recomputes the rest during the backward pass.
"""

from __future__ import annotations

import math
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from typing import Any, TypeGuard

import numpy as np
import torch
import torch.utils.checkpoint
from torch import nn

from .data import IGNORE_INDEX, Encoded


@dataclass(frozen=True)
class ParamBlock:
    """One trainable weight: its name, shape (out, in) and offset in the flat vector."""

    name: str
    shape: tuple[int, int]
    offset: int

    @property
    def size(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass(frozen=True)
class GradientLayout:
    blocks: tuple[ParamBlock, ...]

    @property
    def dim(self) -> int:
        return sum(b.size for b in self.blocks)

    def describe(self) -> dict:
        return {"dim": self.dim, "blocks": [[b.name, list(b.shape), b.offset] for b in self.blocks]}

    @classmethod
    def from_description(cls, described: dict) -> GradientLayout:
        """The layout ``describe`` wrote (into a manifest)."""
        return cls(tuple(ParamBlock(n, (shape[0], shape[1]), off) for n, shape, off in described["blocks"]))


def trainable_linears(model: nn.Module) -> tuple[GradientLayout, list[nn.Linear]]:
    """The trainable parameters as (layout, owning linear layers), in named_parameters order.

    Only bias-free ``nn.Linear`` weights are supported (that is what LoRA trains);
    anything else trainable is a configuration error we report by name.
    """
    # One walk over the modules, each module's own parameters in turn: named_parameters' order (a shared
    # parameter counts where it is first met). Called once per gradient pass.
    blocks, modules, offset = [], [], 0
    seen: set[int] = set()
    for mod_name, mod in model.named_modules():
        for p_name, p in mod.named_parameters(recurse=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            if not p.requires_grad:
                continue
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if (
                not isinstance(mod, nn.Linear)
                or p is not mod.weight
                or (mod.bias is not None and mod.bias.requires_grad)
            ):
                raise ValueError(
                    f"trainable parameter {name!r} is not the weight of a bias-free nn.Linear; "
                    "per-example gradients support LoRA adapters on linear layers only "
                    "(no modules_to_save, no trainable biases or embeddings)"
                )
            blocks.append(ParamBlock(name, (p.shape[0], p.shape[1]), offset))
            modules.append(mod)
            offset += p.numel()
    if not blocks:
        raise ValueError("model has no trainable parameters; load a LoRA adapter first")
    return GradientLayout(tuple(blocks)), modules


# ----------------------------------------------------------------- batching


@dataclass
class Batch:
    indices: list[int]  # positions in the caller's example list
    input_ids: torch.Tensor  # (B, T), right-padded
    attention_mask: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX on prompt and padding
    n_tokens: int  # real tokens (for throughput)


# The default batch limits: padded tokens (B x T) and examples per batch.
MAX_BATCH_TOKENS = 4096
MAX_BATCH_SIZE = 64
# Per-batch fixed cost, in padded tokens, that the batch split weighs against padding,
# and the padding share the split keeps under (lowering that cost until it does).
BATCH_OVERHEAD_TOKENS = 128
MAX_PADDING_SHARE = 0.05

_CPU = torch.device("cpu")  # reference_gradients' default device


def _split(L: np.ndarray, max_tokens: int, max_batch_size: int, overhead: float) -> list[int]:
    n = len(L)
    cost = np.zeros(n + 1)
    start = np.zeros(n + 1, dtype=np.int64)
    for i in range(1, n + 1):
        longest = int(L[i - 1])
        size = max(1, min(max_batch_size, max_tokens // max(1, longest), i))
        js = np.arange(i - size, i)
        c = cost[js] + (i - js) * longest
        best = int(np.argmin(c))
        cost[i] = c[best] + overhead
        start[i] = js[best]
    ends, i = [], n
    while i > 0:
        ends.append(i)
        i = int(start[i])
    return ends[::-1]


def padding_share(lengths: Sequence[int] | np.ndarray, ends: Sequence[int]) -> float:
    """Padding tokens / all tokens of the batches ``ends`` cut ascending ``lengths`` into."""
    L = np.asarray(lengths, dtype=np.int64)
    begins = [0, *ends[:-1]]
    padded = sum((e - b) * int(L[e - 1]) for b, e in zip(begins, ends, strict=True))
    return 1.0 - int(L.sum()) / padded if padded else 0.0


def batch_bounds(
    lengths: Sequence[int],
    max_tokens: int,
    max_batch_size: int = MAX_BATCH_SIZE,
    overhead_tokens: float = BATCH_OVERHEAD_TOKENS,
    max_padding: float | None = MAX_PADDING_SHARE,
) -> list[int]:
    """Split points of ascending ``lengths`` into batches: ends[k] is the end of batch k.

    Dynamic programming over contiguous splits: minimizes padded tokens (B x longest)
    plus ``overhead_tokens`` per batch, with B <= max_batch_size and B x longest <=
    max_tokens (an example longer than the budget goes alone). If the padding share
    exceeds ``max_padding``, the overhead is halved until it does not (0: no padding).
    """
    L = np.asarray(lengths, dtype=np.int64)
    if len(L) and np.any(L[1:] < L[:-1]):
        raise ValueError("batch_bounds needs lengths in ascending order")
    overhead = float(overhead_tokens)
    while True:
        ends = _split(L, max_tokens, max_batch_size, overhead)
        if max_padding is None or overhead < 1 or padding_share(L, ends) <= max_padding:
            return ends
        overhead = overhead / 2 if overhead >= 2 else 0.0


def length_batches(
    encoded: Sequence[Encoded],
    max_tokens: int,
    max_batch_size: int = MAX_BATCH_SIZE,
    pad_id: int = 0,
    overhead_tokens: float = BATCH_OVERHEAD_TOKENS,
    max_padding: float | None = MAX_PADDING_SHARE,
) -> Iterator[Batch]:
    """Group examples of similar length so that B x T stays under a token budget.

    Sorted by length, split by ``batch_bounds`` (least padding plus per-batch overhead);
    the order inside the result is restored by the caller through ``Batch.indices``.
    """
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), i))
    lengths = [len(encoded[i].input_ids) for i in order]
    begin = 0
    for end in batch_bounds(lengths, max_tokens, max_batch_size, overhead_tokens, max_padding):
        yield _collate(encoded, order[begin:end], pad_id)
        begin = end


def greedy_length_batches(
    encoded: Sequence[Encoded], max_tokens: int, max_batch_size: int = MAX_BATCH_SIZE, pad_id: int = 0
) -> Iterator[Batch]:
    """The previous split (fill the budget greedily over the sorted order), kept for comparison."""
    order = sorted(range(len(encoded)), key=lambda i: (len(encoded[i].input_ids), i))
    batch: list[int] = []
    longest = 0
    for i in order:
        n = len(encoded[i].input_ids)
        if batch and (max(longest, n) * (len(batch) + 1) > max_tokens or len(batch) >= max_batch_size):
            yield _collate(encoded, batch, pad_id)
            batch, longest = [], 0
        batch.append(i)
        longest = max(longest, n)
    if batch:
        yield _collate(encoded, batch, pad_id)


def _collate(encoded: Sequence[Encoded], idx: list[int], pad_id: int) -> Batch:
    T = max(len(encoded[i].input_ids) for i in idx)
    ids = torch.full((len(idx), T), pad_id, dtype=torch.long)
    labels = torch.full((len(idx), T), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(idx), T), dtype=torch.long)
    for row, i in enumerate(idx):
        e = encoded[i]
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return Batch(idx, ids, mask, labels, int(mask.sum()))


def per_example_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross-entropy over each example's label tokens -> (B,)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    ce = nn.functional.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    counts = (shift_labels != IGNORE_INDEX).sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("an example has no completion tokens; filter those out before computing gradients")
    return ce.sum(dim=1) / counts


# ----------------------------------------------------------- the gradient pass


class _IOCapture:
    """Keeps each module's (input, output) of the forward pass being recorded.

    Hooks fire again when gradient checkpointing recomputes a layer during the
    backward pass; those calls are not recorded (the recomputed values are equal).
    """

    def __init__(self, modules: Sequence[nn.Module]):
        self.store: list[list] = [[] for _ in modules]
        self.recording = False
        self.handles = [m.register_forward_hook(self._hook(k)) for k, m in enumerate(modules)]

    def _hook(self, k):
        def hook(mod, inputs, output):
            if self.recording:
                self.store[k].append((inputs[0], output))

        return hook

    @contextmanager
    def record(self):
        self.recording = True
        try:
            yield self.store
        finally:
            self.recording = False

    def remove(self):
        for h in self.handles:
            h.remove()


def _uniform_list(mod: nn.Module) -> TypeGuard[nn.ModuleList]:
    return isinstance(mod, nn.ModuleList) and len(mod) > 0 and len({type(m) for m in mod}) == 1


def repeated_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder layers: a list of same-type modules directly under the decoder
    (``model.layers``, ``transformer.h``), else the longest such list anywhere."""
    body = _causal_lm_body(model)
    if body is not None:
        for child in body.children():
            if _uniform_list(child):
                return child
    best: nn.ModuleList | None = None
    for mod in model.modules():
        if _uniform_list(mod) and (best is None or len(mod) > len(best)):
            best = mod
    if best is None:
        raise ValueError(
            f"{type(model).__name__} has no list of repeated layers to checkpoint; turn gradient_checkpointing off"
        )
    return best


@contextmanager
def checkpointed_layers(model: nn.Module, enabled: bool = True):
    """Run every decoder layer under non-reentrant activation checkpointing (eval mode too).

    Non-reentrant checkpointing keeps the autograd graph of the first forward, so
    gradients with respect to the LoRA layers' outputs are still available.
    """
    if not enabled:
        yield
        return
    layers = list(repeated_layers(model))
    own = [layer.__dict__.get("forward") for layer in layers]  # e.g. an accelerate hook's wrapper
    for layer in layers:

        def forward(*args, _inner=layer.forward, **kwargs):
            return torch.utils.checkpoint.checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        layer.forward = forward
    try:
        yield
    finally:
        for layer, previous in zip(layers, own, strict=False):
            if previous is None:
                del layer.forward
            else:
                layer.forward = previous


@dataclass(frozen=True)
class CausalLMParts:
    """A causal LM split into its decoder (token ids -> last hidden states) and output layer."""

    body: nn.Module
    head: nn.Module


def _base_model(model: nn.Module) -> nn.Module:
    """The model a PEFT wrapper wraps (``get_base_model()``), else the model itself."""
    get_base_model = getattr(model, "get_base_model", None)
    return get_base_model() if get_base_model is not None else model


def _causal_lm_body(model: nn.Module) -> nn.Module | None:
    """The decoder of a Hugging Face causal LM (PEFT-wrapped or not): ``model.model``, ``model.transformer``."""
    lm = _base_model(model)
    prefix = getattr(lm, "base_model_prefix", "")
    body = getattr(lm, prefix, None) if prefix else None
    return body if isinstance(body, nn.Module) and body is not lm else None


def split_causal_lm(model: nn.Module) -> CausalLMParts | None:
    """The decoder and output layer of a Hugging Face causal LM (PEFT-wrapped or not), or None."""
    lm = _base_model(model)
    body = _causal_lm_body(model)
    get_output_embeddings = getattr(lm, "get_output_embeddings", None)
    head = get_output_embeddings() if get_output_embeddings is not None else None
    if body is None or not isinstance(head, nn.Module):
        return None
    if any(p.requires_grad for p in head.parameters()):
        return None  # a LoRA on the output layer needs its (B, T, .) inputs: use the full logits
    return CausalLMParts(body, head)


def completion_losses(
    parts: CausalLMParts, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor
) -> torch.Tensor:
    """Per-example mean completion loss, with the output layer run on completion positions only."""
    hidden = parts.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)[0]
    target = labels[:, 1:]
    keep = target != IGNORE_INDEX
    counts = keep.sum(dim=1)
    if bool((counts == 0).any()):
        raise ValueError("an example has no completion tokens; filter those out before computing gradients")
    logits = parts.head(hidden[:, :-1][keep])  # (completion tokens, vocab)
    ce = nn.functional.cross_entropy(logits.float(), target[keep], reduction="none")
    rows = keep.nonzero(as_tuple=True)[0]
    return torch.zeros(len(counts), dtype=ce.dtype, device=ce.device).index_add_(0, rows, ce) / counts


_HEAD_CHECKED: weakref.WeakKeyDictionary[nn.Module, bool] = weakref.WeakKeyDictionary()


def completion_head_matches(model: nn.Module, parts: CausalLMParts, batch: Batch, device: torch.device) -> bool:
    """Whether body + head reproduce the model's own logits (no soft-capping, scaling, ...) on one example.

    Checked once per model object.
    """
    if model in _HEAD_CHECKED:
        return _HEAD_CHECKED[model]
    n = int(batch.attention_mask[0].sum())
    ids = batch.input_ids[:1, :n].to(device)
    try:
        with torch.no_grad():
            full = model(input_ids=ids, use_cache=False).logits.float()
            mine = parts.head(parts.body(input_ids=ids, use_cache=False)[0]).float()
        same = full.shape == mine.shape and torch.allclose(full, mine, rtol=1e-4, atol=1e-4)
    except Exception:  # a decoder that cannot be called on its own: full logits
        same = False
    _HEAD_CHECKED[model] = same
    return _HEAD_CHECKED[model]


def autocast_for(device: torch.device, dtype: torch.dtype):
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast("cuda", dtype=dtype)
    return nullcontext()


def batch_block_gradients(
    model: nn.Module,
    capture: _IOCapture,
    batch: Batch,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    parts: CausalLMParts | None = None,
) -> tuple[torch.Tensor, Iterator[tuple[int, torch.Tensor]]]:
    """Run one forward/backward; return (per-example losses, iterator of (block, grads (B, size))).

    Gradients are produced block by block so a caller can project and drop
    each one: the batch never holds a B x D matrix unless the caller builds it.
    ``parts``: run the output layer on completion positions only (see ``completion_losses``).
    """
    ids = batch.input_ids.to(device)
    mask = batch.attention_mask.to(device)
    labels = batch.labels.to(device)
    for calls in capture.store:
        calls.clear()
    with capture.record() as store, autocast_for(device, dtype):
        if parts is not None:
            losses = completion_losses(parts, ids, mask, labels)
        else:
            losses = per_example_loss(model(input_ids=ids, attention_mask=mask, use_cache=False).logits, labels)
    for k, calls in enumerate(store):
        if len(calls) != 1:
            raise RuntimeError(
                f"trainable layer {k} ran {len(calls)} times in one forward pass; "
                "shared (tied) LoRA layers are not supported"
            )
    outputs = [calls[0][1] for calls in store]
    grads_out = torch.autograd.grad(losses.sum(), outputs, allow_unused=True)

    def blocks():
        for k, (calls, gy) in enumerate(zip(store, grads_out, strict=False)):
            x = calls[0][0]
            B = x.shape[0]
            if gy is None:  # layer not on the loss path
                yield k, torch.zeros(B, outputs[k].shape[-1] * x.shape[-1], device=device)
                continue
            gy = gy.float().reshape(B, -1, gy.shape[-1])
            xf = x.detach().float().reshape(B, -1, x.shape[-1])
            if gy.shape[-1] > xf.shape[-1]:  # (out, in) = (x^T gy)^T: fewer rows is faster (LoRA B)
                yield k, torch.bmm(xf.transpose(1, 2), gy).transpose(1, 2).reshape(B, -1)
            else:
                yield k, torch.bmm(gy.transpose(1, 2), xf).reshape(B, -1)
        for calls in store:
            calls.clear()

    return losses.detach(), blocks()


@dataclass
class PassStats:
    examples: int = 0
    tokens: int = 0
    padded_tokens: int = 0  # B x T summed over batches
    batches: int = 0
    seconds: float = 0.0
    completion_only_logits: bool = False

    @property
    def padding_share(self) -> float:
        return 1.0 - self.tokens / self.padded_tokens if self.padded_tokens else 0.0

    def timing(self) -> dict:
        """What the feature assets record per checkpoint (meta.json ``timings``)."""
        return {
            "seconds": self.seconds,
            "examples_per_s": self.examples_per_s,
            "tokens_per_s": self.tokens_per_s,
            "batches": self.batches,
            "padding_share": round(self.padding_share, 4),
        }

    @property
    def examples_per_s(self) -> float:
        return self.examples / self.seconds if self.seconds else math.nan

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else math.nan


def gradient_pass(
    model: nn.Module,
    encoded: Sequence[Encoded],
    consume: Callable[[Batch, torch.Tensor, Iterator], None],
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    max_tokens: int = MAX_BATCH_TOKENS,
    max_batch_size: int = MAX_BATCH_SIZE,
    pad_id: int = 0,
    gradient_checkpointing: bool = False,
    progress: Callable[[int, int, PassStats], None] | None = None,
    linears: tuple[GradientLayout, list[nn.Linear]] | None = None,
) -> PassStats:
    """Drive the per-example gradient computation over examples in length-sorted batches.

    ``linears``: ``trainable_linears(model)`` when the caller has it already.
    """
    model.eval()
    _, modules = linears or trainable_linears(model)
    parts = split_causal_lm(model)
    stats = PassStats()
    batches = length_batches(encoded, max_tokens, max_batch_size, pad_id)
    capture = _IOCapture(modules)
    start = time.perf_counter()
    try:
        with checkpointed_layers(model, gradient_checkpointing):
            for batch in batches:
                if stats.examples == 0:
                    if parts is not None and not completion_head_matches(model, parts, batch, device):
                        parts = None  # the model post-processes its logits: compute them all
                    stats.completion_only_logits = parts is not None
                losses, blocks = batch_block_gradients(model, capture, batch, device, dtype, parts)
                consume(batch, losses, blocks)
                stats.examples += len(batch.indices)
                stats.tokens += batch.n_tokens
                stats.padded_tokens += batch.input_ids.numel()
                stats.batches += 1
                stats.seconds = time.perf_counter() - start
                if progress is not None:
                    progress(stats.examples, len(encoded), stats)
    finally:
        capture.remove()
    return stats


def full_gradients(
    model: nn.Module, encoded: Sequence[Encoded], out: np.ndarray | None = None, **kwargs
) -> tuple[np.ndarray, np.ndarray]:
    """All per-example gradients as an (N, D) float32 array (pass a memmap as ``out`` for big N x D).

    Returns (gradients, losses).
    """
    layout, modules = trainable_linears(model)
    if out is None:
        out = np.zeros((len(encoded), layout.dim), dtype=np.float32)
    losses = np.zeros(len(encoded), dtype=np.float64)

    def consume(batch, batch_losses, blocks):
        rows = np.asarray(batch.indices)
        order = np.argsort(rows)  # memmaps write faster in row order
        losses[rows] = batch_losses.cpu().double().numpy()
        # Block by block: peak memory is B x (largest block), never B x D.
        for k, g in blocks:
            b = layout.blocks[k]
            out[rows[order], b.offset : b.offset + b.size] = g.cpu().numpy()[order]

    device = kwargs.pop("device", torch.device("cpu"))
    gradient_pass(model, encoded, consume, device=device, linears=(layout, modules), **kwargs)
    return out, losses


def block_features(
    model: nn.Module,
    encoded: Sequence[Encoded],
    add_block: Callable[[torch.Tensor, int, torch.Tensor], None],
    out_dim: int,
    **kwargs,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, PassStats]:
    """Per-example features sum_k P_k(g_k), built block by block: ``add_block(acc, k, g_k)`` adds block k's
    share (B, out_dim) of the batch's projection into ``acc``. Returns (z (N, out_dim), |g|, losses, stats)."""
    device = kwargs.pop("device", torch.device("cpu"))
    n = len(encoded)
    z = np.zeros((n, out_dim), dtype=np.float32)
    norms = np.zeros(n, dtype=np.float64)
    losses = np.zeros(n, dtype=np.float64)

    def consume(batch, batch_losses, blocks):
        acc = torch.zeros(len(batch.indices), out_dim, device=device)
        sq = torch.zeros(len(batch.indices), device=device, dtype=torch.float64)
        for k, g in blocks:
            add_block(acc, k, g)
            sq += (g * g).sum(dim=1, dtype=torch.float64)
        rows = np.asarray(batch.indices)
        z[rows] = acc.cpu().numpy()
        norms[rows] = sq.sqrt().cpu().numpy()
        losses[rows] = batch_losses.cpu().double().numpy()

    stats = gradient_pass(model, encoded, consume, device=device, **kwargs)
    return z, norms, losses, stats


def basis_projection(
    layout: GradientLayout, basis: torch.Tensor, device: torch.device = _CPU
) -> Callable[[torch.Tensor, int, torch.Tensor], None]:
    """``add_block`` for z = g V with ``basis`` V (D x K), sliced block by block to match the flat layout."""
    if basis.shape[0] != layout.dim:
        raise ValueError(
            f"basis has {basis.shape[0]} rows but the model's LoRA gradient has "
            f"{layout.dim} entries; the basis was built for another adapter"
        )
    basis = basis.to(device=device, dtype=torch.float32)
    slices = [basis[b.offset : b.offset + b.size] for b in layout.blocks]

    def add_block(acc: torch.Tensor, k: int, g: torch.Tensor) -> None:
        acc.add_(g @ slices[k])

    return add_block


class SideBySide:
    """Several projections from one gradient pass: ``add_block`` writes each (add_block, width) part into its
    own columns of the accumulator (``columns``, ``width`` in all), and times each part's share, so that a
    shared pass can say what each projection cost on top of the backward (``part_seconds``)."""

    # CUDA timing events kept before they are read (one synchronize per this many part calls).
    EVENTS_PER_SYNC = 4096

    def __init__(self, parts: Sequence[tuple[Callable[[torch.Tensor, int, torch.Tensor], None], int]]):
        self.parts = list(parts)
        self.columns: list[slice] = []
        start = 0
        for _, width in self.parts:
            self.columns.append(slice(start, start + width))
            start += width
        self.width = start
        self._seconds = [0.0] * len(self.parts)
        self._events: list[tuple[int, Any, Any]] = []  # CUDA is asynchronous: timed by events, read later

    def add_block(self, acc: torch.Tensor, k: int, g: torch.Tensor) -> None:
        for i, ((add, _), cols) in enumerate(zip(self.parts, self.columns, strict=True)):
            if g.is_cuda:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                begin.record()
                add(acc[:, cols], k, g)
                end.record()
                self._events.append((i, begin, end))
                if len(self._events) >= self.EVENTS_PER_SYNC:
                    self._read_events()
            else:
                t0 = time.perf_counter()
                add(acc[:, cols], k, g)
                self._seconds[i] += time.perf_counter() - t0

    def _read_events(self) -> None:
        if self._events:
            torch.cuda.synchronize()
            for i, begin, end in self._events:
                self._seconds[i] += begin.elapsed_time(end) / 1000.0
            self._events.clear()

    def part_seconds(self) -> list[float]:
        """Seconds spent in each part's projection so far."""
        self._read_events()
        return list(self._seconds)


def projected_gradients(
    model: nn.Module, encoded: Sequence[Encoded], basis: torch.Tensor, **kwargs
) -> tuple[np.ndarray, np.ndarray, np.ndarray, PassStats]:
    """Per-example gradients projected on ``basis`` (D x K): returns (z (N, K), |g| (N,), losses, stats).

    ``basis`` may hold the bases of many targets side by side, so one pass serves them all.
    """
    layout, modules = trainable_linears(model)
    add_block = basis_projection(layout, basis, kwargs.get("device", _CPU))
    return block_features(model, encoded, add_block, basis.shape[1], linears=(layout, modules), **kwargs)


def reference_gradients(model: nn.Module, encoded: Sequence[Encoded], device: torch.device = _CPU) -> np.ndarray:
    """The obviously-right way: batch size 1, ``loss.backward()``, concatenated ``p.grad``.

    Slow; used by tests and benchmarks as the baseline.
    """
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for e in encoded:
        ids = torch.tensor([e.input_ids], device=device)
        labels = torch.tensor([e.labels], device=device)
        model.zero_grad(set_to_none=True)
        logits = model(input_ids=ids).logits
        loss = per_example_loss(logits, labels)[0]
        loss.backward()
        # after backward() every trainable parameter the loss depends on has a .grad
        rows.append(torch.cat([p.grad.flatten() for p in params]).cpu().numpy())  # type: ignore[union-attr]
    model.zero_grad(set_to_none=True)
    return np.stack(rows).astype(np.float32)
