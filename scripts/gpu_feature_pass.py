"""Feature-pass throughput on a CUDA GPU: a real Hugging Face causal LM, or a real architecture's shape.

``--model PATH_OR_HUB_ID`` loads a causal LM from a local directory or the local Hugging
Face cache (``local_files_only``: nothing is downloaded at run time); without it, a
model is built from a real architecture's config with random weights (``--arch``).
Weights are float32 as the pipeline loads them (``--weights-dtype bfloat16`` halves
them), with bf16 autocast. LoRA (default r=128, alpha=512 on q/k/v/o, the paper's
setting) is attached with the LoRA weights perturbed to non-zero; a few thousand
synthetic candidates (random token ids) run through the candidate feature pass
``projected_gradients(..., device=cuda, dtype=torch.bfloat16, max_tokens=...)`` in
``length_batches``. Prints per variant seconds, examples/s, tokens/s, peak GPU memory
(``torch.cuda.max_memory_allocated``) and MFU, then the ratios of
benchmarks/bench_feature_pass.py:

a. feature pass / a LoRA training step over the same length batches with the output
   layer on completion positions only (``completion_losses(...).mean().backward()``,
   no optimizer step), tokens/s; also against the plain step (logits everywhere);
b. speedup over the reference approach on the same small subset: batch size 1, the
   full LoRA gradient concatenated, then multiplied by the projection. On a GPU the
   reference keeps everything on the device (``loss.backward()``, ``torch.cat`` of the
   LoRA grads, ``@ basis``) under the same autocast; on CPU it is
   ``gist_core.gradients.reference_gradients`` followed by a numpy matmul;
c. time with three targets' bases side by side (D x 48) / one target (D x 16);
and the feature pass with gradient checkpointing (time and peak memory against without).

MFU = 6 * N * tokens / seconds / peak, N = the base model's parameters less the input
embedding (counted once if tied to the output layer), tokens = real (unpadded) tokens:
the usual forward + backward count, with no attention-score FLOPs. A LoRA step needs
no gradients of the frozen weights, so its matmul work is nearer 4 * N per token; the
``MFU 4N`` column uses that count. Peak: dense bf16 tensor FLOP/s looked up from the
device name (``PEAK_BF16_TFLOPS``), or ``--peak-tflops``.

Variants are interleaved per length batch over repeats (rotating order), medians reported.

    # a real model from a local directory or the HF cache (no download)
    python scripts/gpu_feature_pass.py --model meta-llama/Llama-2-7b-hf --candidates 1000 --repeats 2
    # on a GPU machine: a 7B-shaped Llama-2 with 8 layers (full depth: --layers 0, ~100 GB)
    python scripts/gpu_feature_pass.py --arch llama2-7b --layers 8 --candidates 500 --repeats 1
    # smoke test anywhere (add --model DIR to load a saved model)
    python scripts/gpu_feature_pass.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import lora_model, machine_line, orthonormal_basis, synthetic_candidates, table, with_lora  # noqa: E402

# Dense (no sparsity) bf16 tensor-core peak, TFLOP/s, from the vendors' datasheets; first match
# of the name (lower case) wins, so the more specific names come first.
PEAK_BF16_TFLOPS = [
    ("gh200", 989.0),
    ("h200", 989.0),
    ("h100 pcie", 756.0),
    ("h100 nvl", 835.0),
    ("h100", 989.0),
    ("h800", 989.0),
    ("b200", 2250.0),
    ("a100", 312.0),
    ("a800", 312.0),
    ("l40s", 362.0),
    ("l40", 181.0),
    ("l4", 121.0),
    ("a10", 125.0),
    ("mi300x", 1307.0),
]


def peak_tflops(device_name: str) -> float | None:
    name = device_name.lower()
    return next((v for key, v in PEAK_BF16_TFLOPS if key in name), None)


def flop_params(model) -> int:
    """Parameters that take part in the per-token matmuls: all but the input embedding (once if tied)."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    base = [p for n, p in lm.named_parameters() if "lora_" not in n]
    total = sum(p.numel() for p in {id(p): p for p in base}.values())
    emb, head = lm.get_input_embeddings(), lm.get_output_embeddings()
    tied = head is not None and head.weight.data_ptr() == emb.weight.data_ptr()
    return total if tied else total - emb.weight.numel()


def guess_targets(model) -> list[str]:
    names = {n.split(".")[-1] for n, _ in model.named_modules()}
    for choice in (["q_proj", "k_proj", "v_proj", "o_proj"], ["c_attn", "c_proj"], ["query_key_value", "dense"]):
        if all(c in names for c in choice):
            return choice
    raise SystemExit(f"cannot guess LoRA target modules for {type(model).__name__}; give --targets")


ARCHS: dict[str, tuple[str, dict[str, Any]]] = {
    # Llama-2-7B: 32 layers, hidden 4096, MHA, vocab 32000
    "llama2-7b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=11008,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            max_position_embeddings=4096,
        ),
    ),
    # Llama-3-8B: grouped-query attention (8 KV heads), vocab 128256
    "llama3-8b": (
        "llama",
        dict(
            vocab_size=128256,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=8192,
            rope_theta=500000.0,
        ),
    ),
    # Mistral-7B-v0.1: GQA, vocab 32000
    "mistral-7b": (
        "mistral",
        dict(
            vocab_size=32000,
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            max_position_embeddings=32768,
            sliding_window=None,
        ),
    ),
    # Llama-2-13B
    "llama2-13b": (
        "llama",
        dict(
            vocab_size=32000,
            hidden_size=5120,
            intermediate_size=13824,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            max_position_embeddings=4096,
        ),
    ),
    # Tiny (for --tiny smoke tests)
    "tiny": (
        "llama",
        dict(
            vocab_size=512,
            hidden_size=64,
            intermediate_size=176,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=512,
        ),
    ),
}


def make_config(arch: str, layers: int):
    from transformers import LlamaConfig, MistralConfig

    family, kw = ARCHS[arch]
    kw = dict(kw)
    if layers:
        kw["num_hidden_layers"] = layers
    return (MistralConfig if family == "mistral" else LlamaConfig)(**kw)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--model",
        default=None,
        metavar="PATH_OR_HUB_ID",
        help="a Hugging Face causal LM: a local directory or a hub id in the local cache (no download)",
    )
    p.add_argument(
        "--weights-dtype",
        choices=["float32", "bfloat16"],
        default="float32",
        help="dtype of the loaded weights (float32 as the pipeline loads them)",
    )
    p.add_argument("--targets", default=None, help="LoRA target modules, comma-separated (default q/k/v/o or a guess)")
    p.add_argument(
        "--peak-tflops",
        type=float,
        default=None,
        help="the device's dense bf16 peak in TFLOP/s for MFU (default: looked up from the device name)",
    )
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama2-7b")
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the architecture's)")
    p.add_argument(
        "--tiny",
        action="store_true",
        help="smoke test: tiny arch, r=8, 64 candidates of 16-64 tokens, subset 6, 1 repeat",
    )
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float32"],
        default=None,
        help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)",
    )
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--alpha", type=int, default=512)
    p.add_argument("--candidates", type=int, default=2000)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument(
        "--max-tokens",
        type=int,
        default=4096,
        help="token budget per batch (B x T); a 7B model needs roughly 7 MB of activations per token (estimate)",
    )
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--subset", type=int, default=32, help="candidates for the bs=1 reference")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.tiny:
        args.arch, args.r, args.alpha = "tiny", 8, 32
        args.candidates, args.min_len, args.max_len, args.subset, args.repeats = 64, 16, 64, 6, 1
        args.max_tokens = min(args.max_tokens, 1024)

    import numpy as np
    import torch

    from gist_core.gradients import (
        completion_losses,
        length_batches,
        projected_gradients,
        reference_gradients,
        split_causal_lm,
        trainable_linears,
    )

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --tiny for a CPU smoke test")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = (
        (lambda: torch.autocast("cuda", dtype=dtype)) if cuda and dtype != torch.float32 else contextlib.nullcontext
    )

    where = torch.cuda.get_device_name(device) if cuda else machine_line()
    peak_tf = args.peak_tflops or (peak_tflops(where) if cuda else None)
    what = f"model {args.model}" if args.model else f"arch {args.arch} (layers {args.layers or 'as configured'})"
    print(
        f"# gpu_feature_pass: {where}; torch {torch.__version__}; {what}; autocast {dtype}; bf16 peak "
        + (
            f"{peak_tf:g} TFLOP/s" + (" (--peak-tflops)" if args.peak_tflops else " (looked up)")
            if peak_tf
            else "unknown (no MFU; give --peak-tflops)"
        )
    )
    t0 = time.perf_counter()
    if args.model:
        from gist_core.modeling import load_causal_lm

        base = load_causal_lm(args.model, device, getattr(torch, args.weights_dtype))
        targets = args.targets.split(",") if args.targets else guess_targets(base)
        model, n_base = with_lora(base, r=args.r, alpha=args.alpha, seed=args.seed, targets=targets, device=device)
        cfg = base.config
    else:
        cfg = make_config(args.arch, args.layers)
        targets = args.targets.split(",") if args.targets else ["q_proj", "k_proj", "v_proj", "o_proj"]
        model, n_base = lora_model(cfg, r=args.r, alpha=args.alpha, seed=args.seed, device=device, targets=targets)
    layout, _ = trainable_linears(model)
    D = layout.dim
    n_flop = flop_params(model)
    sync()
    print(
        f"model: {n_base:,} parameters ({n_flop:,} in the per-token matmuls; {cfg.num_hidden_layers} layers, "
        f"hidden {cfg.hidden_size}, vocab {cfg.vocab_size}), LoRA r={args.r} alpha={args.alpha} on "
        f"{'/'.join(targets)}: D={D:,} in {len(layout.blocks)} blocks; built in {time.perf_counter() - t0:.1f}s",
        flush=True,
    )
    cands = synthetic_candidates(args.candidates, cfg.vocab_size, args.min_len, args.max_len, seed=args.seed)
    bases = [orthonormal_basis(D, 16, seed=args.seed + 10 + t, device=device) for t in range(3)]
    one, three = bases[0], torch.cat(bases, dim=1).contiguous()
    del bases
    kw = dict(device=device, dtype=dtype, max_tokens=args.max_tokens, max_batch_size=args.max_batch_size)
    params = [q for q in model.parameters() if q.requires_grad]

    def train_on(exs):
        sync()
        t = time.perf_counter()
        for b in length_batches(exs, args.max_tokens, args.max_batch_size):
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = model(
                    input_ids=b.input_ids.to(device),
                    attention_mask=b.attention_mask.to(device),
                    labels=b.labels.to(device),
                ).loss
            loss.backward()
        sync()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return dt

    parts = split_causal_lm(model)

    def train_completion_on(exs):
        """The training step with the output layer on completion positions only, as the feature pass."""
        sync()
        t = time.perf_counter()
        for b in length_batches(exs, args.max_tokens, args.max_batch_size):
            model.zero_grad(set_to_none=True)
            with autocast():
                loss = completion_losses(
                    parts, b.input_ids.to(device), b.attention_mask.to(device), b.labels.to(device)
                ).mean()
            loss.backward()
        sync()
        dt = time.perf_counter() - t
        model.zero_grad(set_to_none=True)
        return dt

    def feat_on(exs, basis, checkpointing=False):
        sync()
        t = time.perf_counter()
        projected_gradients(model, exs, basis, gradient_checkpointing=checkpointing, **kw)
        sync()
        return time.perf_counter() - t

    def reference_projected(exs, basis):
        """bs=1, full gradient concatenated, then projected: (len(exs), k) on the host.

        On CUDA everything stays on the device under the same autocast;
        ``reference_gradients`` would copy each D-vector to the host."""
        if not cuda:
            return reference_gradients(model, exs, device=device) @ basis.cpu().numpy()
        from gist_core.gradients import per_example_loss

        rows = []
        for e in exs:
            model.zero_grad(set_to_none=True)
            with autocast():
                logits = model(input_ids=torch.tensor([e.input_ids], device=device)).logits
            per_example_loss(logits, torch.tensor([e.labels], device=device))[0].backward()
            rows.append(torch.cat([q.grad.flatten() for q in params]).float() @ basis)
        model.zero_grad(set_to_none=True)
        return torch.stack(rows).cpu().numpy()

    def ref_on(exs, basis):
        sync()
        t = time.perf_counter()
        reference_projected(exs, basis)
        sync()
        return time.perf_counter() - t

    batches = list(length_batches(cands, args.max_tokens, args.max_batch_size))
    units = [[cands[i] for i in b.indices] for b in batches]
    tokens = sum(b.n_tokens for b in batches)
    padded = sum(b.input_ids.numel() for b in batches)
    print(
        f"{len(cands)} candidates of {args.min_len}-{args.max_len} tokens: {tokens:,} tokens in {len(batches)} "
        f"batches of <= {args.max_tokens} tokens, padding share {1 - tokens / padded:.1%}",
        flush=True,
    )
    model.eval()
    # Warm-up (kernels, allocator) on the longest batch, then reset the peak-memory counter.
    feat_on(units[-1], three)
    train_on(units[-1])
    if parts is not None:
        train_completion_on(units[-1])
    ref_on(units[-1][:1], one)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    fns = {
        "train step": train_on,
        "train step, completion logits": train_completion_on,
        "feature k=16": lambda u: feat_on(u, one),
        "feature k=48": lambda u: feat_on(u, three),
        "feature k=16 checkpointed": lambda u: feat_on(u, one, checkpointing=True),
    }
    if parts is None:  # no separable output layer: the fair step is the plain one
        del fns["train step, completion logits"]
    names = list(fns)
    peak: dict[str, int] = {}
    totals: dict[str, list[float]] = {v: [] for v in names}
    for rep in range(args.repeats):
        acc = dict.fromkeys(names, 0.0)
        for j, u in enumerate(units):
            shift = (rep + j) % len(names)
            for v in names[shift:] + names[:shift]:
                if cuda and rep == 0:
                    torch.cuda.reset_peak_memory_stats(device)
                acc[v] += fns[v](u)
                if cuda and rep == 0:
                    peak[v] = max(peak.get(v, 0), torch.cuda.max_memory_allocated(device))
        for v in names:
            totals[v].append(acc[v])
        print(f"  rep {rep + 1}/{args.repeats}: " + ", ".join(f"{v} {acc[v]:.2f}s" for v in names), flush=True)

    subset = cands[: args.subset]
    sub_batches = list(length_batches(subset, args.max_tokens, args.max_batch_size))
    sub_units = [[subset[i] for i in b.indices] for b in sub_batches]
    sub_tokens = sum(b.n_tokens for b in sub_batches)
    ref_totals: dict[str, list[float]] = {"reference bs=1": [], "feature k=16": []}
    for rep in range(args.repeats):
        acc = dict.fromkeys(ref_totals, 0.0)
        for j, u in enumerate(sub_units):
            order = list(ref_totals) if (rep + j) % 2 == 0 else list(ref_totals)[::-1]
            for v in order:
                if cuda and rep == 0:
                    torch.cuda.reset_peak_memory_stats(device)
                acc[v] += ref_on(u, one) if v == "reference bs=1" else feat_on(u, one)
                if cuda and rep == 0 and v == "reference bs=1":
                    peak[v] = max(peak.get(v, 0), torch.cuda.max_memory_allocated(device))
        for v in acc:
            ref_totals[v].append(acc[v])
        print(f"  reference rep {rep + 1}/{args.repeats}: " + ", ".join(f"{v} {acc[v]:.2f}s" for v in acc), flush=True)

    # Sanity (not timing): ours vs the reference on two short examples, same autocast.
    check = sorted(subset, key=lambda e: len(e.input_ids))[:2]
    z, _, _, check_stats = projected_gradients(model, check, one, **kw)
    zr = reference_projected(check, one)
    err = float(np.max(np.abs(z - zr)) / max(1e-12, float(np.max(np.abs(zr)))))

    def mfu(n_tokens, secs, per_token):
        return f"{per_token * n_flop * n_tokens / secs / (peak_tf * 1e12):.1%}" if peak_tf else "-"

    med = {v: statistics.median(xs) for v, xs in totals.items()}
    rmed = {v: statistics.median(xs) for v, xs in ref_totals.items()}
    rows = [
        {
            "variant": v,
            "seconds": f"{med[v]:.2f}",
            "examples/s": f"{len(cands) / med[v]:,.1f}",
            "tokens/s": f"{tokens / med[v]:,.0f}",
            "MFU 6N": mfu(tokens, med[v], 6),
            "MFU 4N": mfu(tokens, med[v], 4),
            "peak GPU memory GiB": f"{peak[v] / 2**30:.1f}" if v in peak else "-",
        }
        for v in names
    ]
    rows += [
        {
            "variant": f"{v} (subset of {len(subset)})",
            "seconds": f"{rmed[v]:.2f}",
            "examples/s": f"{len(subset) / rmed[v]:,.1f}",
            "tokens/s": f"{sub_tokens / rmed[v]:,.0f}",
            "MFU 6N": mfu(sub_tokens, rmed[v], 6),
            "MFU 4N": mfu(sub_tokens, rmed[v], 4),
            "peak GPU memory GiB": f"{peak[v] / 2**30:.1f}" if v in peak and v.startswith("ref") else "-",
        }
        for v in ref_totals
    ]
    print(
        f"\nThroughput (median of {args.repeats} interleaved repeats; MFU = k * N * tokens / s / peak, "
        f"N = {n_flop:,}, peak {peak_tf or '?'} TFLOP/s bf16 dense)"
    )
    print(table(rows))
    fair = "train step, completion logits" if "train step, completion logits" in med else "train step"
    a = med[fair] / med["feature k=16"]
    a_plain = med["train step"] / med["feature k=16"]
    b = (rmed["reference bs=1"] / len(subset)) / (med["feature k=16"] / len(cands))
    b_same = rmed["reference bs=1"] / rmed["feature k=16"]
    c = med["feature k=48"] / med["feature k=16"]
    print("\nRATIOS")
    print(
        table(
            [
                {
                    "ratio": "a. feature / train-step tokens/s",
                    "baseline": f"{fair}, same batches",
                    "value": f"{a:.3f}",
                    "goal (CPU bench)": ">= 0.95",
                },
                {
                    "ratio": "   (extra) feature / train-step tokens/s",
                    "baseline": "train step, logits everywhere",
                    "value": f"{a_plain:.3f}",
                    "goal (CPU bench)": "-",
                },
                {
                    "ratio": "b. speedup over the bs=1 reference",
                    "baseline": f"bs=1 reference, same {len(subset)} examples",
                    "value": f"{b_same:.2f}x",
                    "goal (CPU bench)": ">= 1.9x",
                },
                {
                    "ratio": "   (extra) speedup per example",
                    "baseline": f"reference on {len(subset)} vs all {len(cands)}",
                    "value": f"{b:.2f}x",
                    "goal (CPU bench)": "-",
                },
                {
                    "ratio": "c. time k=48 / k=16",
                    "baseline": "feature k=16",
                    "value": f"{c:.3f}",
                    "goal (CPU bench)": "<= 1.15",
                },
                {
                    "ratio": "gradient checkpointing: time / without",
                    "baseline": "feature k=16",
                    "value": f"{med['feature k=16 checkpointed'] / med['feature k=16']:.3f}",
                    "goal (CPU bench)": "-",
                },
            ]
            + (
                [
                    {
                        "ratio": "gradient checkpointing: peak GPU memory / without",
                        "baseline": "feature k=16",
                        "value": f"{peak['feature k=16 checkpointed'] / peak['feature k=16']:.3f}",
                        "goal (CPU bench)": "-",
                    }
                ]
                if cuda
                else []
            )
        )
    )
    print(
        f"check: projected_gradients vs the bs=1 reference @ basis, relative max error {err:.1e} "
        f"({'bf16 autocast' if dtype == torch.bfloat16 else 'float32'}; output layer on "
        f"{'completion positions only' if check_stats.completion_only_logits else 'all positions'})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
