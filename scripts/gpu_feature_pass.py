"""Feature-pass throughput on a CUDA GPU with a real architecture's shape (random weights).

Builds a model from a config of a real architecture (no download: random weights,
float32 parameters as the pipeline loads them, bf16 autocast), attaches LoRA
(default r=128, alpha=512 on q/k/v/o, the paper's setting) with the LoRA weights
perturbed to non-zero, makes a few thousand synthetic candidates, and runs the
candidate feature pass ``projected_gradients(..., device=cuda, dtype=torch.bfloat16,
max_tokens=...)``. Prints examples/s, tokens/s, peak GPU memory
(``torch.cuda.max_memory_allocated``) and the ratios of benchmarks/bench_feature_pass.py:

a. feature pass / a plain LoRA training step (forward + backward of the batch-mean
   loss, ``loss.backward()``, no optimizer step) over the same length batches, tokens/s;
b. speedup per example over the reference approach, timed on a small subset: batch
   size 1, the full LoRA gradient concatenated, then multiplied by the projection
   (reference time per example on the subset / feature-pass time per example over all
   candidates; the same-subset ratio is printed too). On a GPU the reference
   keeps everything on the device (``loss.backward()``, ``torch.cat`` of the LoRA
   grads, ``@ basis`` on the GPU) under the same autocast; on CPU it is
   ``gist_core.gradients.reference_gradients`` followed by a numpy matmul;
c. time with three targets' bases side by side (D x 48) / one target (D x 16);
and the feature pass with gradient checkpointing (time and peak memory against without).

Variants are interleaved per length batch over repeats (rotating order), medians reported.

    # on a GPU machine: a 7B-shaped Llama-2 with 8 layers (full depth: --layers 0, ~100 GB)
    python scripts/gpu_feature_pass.py --arch llama2-7b --layers 8 --candidates 500 --repeats 1
    # smoke test anywhere
    python scripts/gpu_feature_pass.py --device cpu --tiny
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from _common import lora_model, machine_line, orthonormal_basis, synthetic_candidates, table  # noqa: E402

ARCHS = {
    # Llama-2-7B: 32 layers, hidden 4096, MHA, vocab 32000
    "llama2-7b": ("llama", dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096)),
    # Llama-3-8B: grouped-query attention (8 KV heads), vocab 128256
    "llama3-8b": ("llama", dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                                rope_theta=500000.0)),
    # Mistral-7B-v0.1: GQA, vocab 32000
    "mistral-7b": ("mistral", dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                                   num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                                   max_position_embeddings=32768, sliding_window=None)),
    # Llama-2-13B
    "llama2-13b": ("llama", dict(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_hidden_layers=40,
                                 num_attention_heads=40, num_key_value_heads=40, max_position_embeddings=4096)),
    # Tiny (for --tiny smoke tests)
    "tiny": ("llama", dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)),
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
    p.add_argument("--arch", choices=sorted(ARCHS), default="llama2-7b")
    p.add_argument("--layers", type=int, default=0, help="override the number of layers (0: the architecture's)")
    p.add_argument("--tiny", action="store_true",
                   help="smoke test: tiny arch, r=8, 64 candidates of 16-64 tokens, subset 6, 1 repeat")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu")
    p.add_argument("--dtype", choices=["bfloat16", "float32"], default=None,
                   help="autocast dtype (default bfloat16 on CUDA, float32 on CPU)")
    p.add_argument("--r", type=int, default=128)
    p.add_argument("--alpha", type=int, default=512)
    p.add_argument("--candidates", type=int, default=2000)
    p.add_argument("--min-len", type=int, default=64)
    p.add_argument("--max-len", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=4096,
                   help="token budget per batch (B x T); a 7B model needs roughly 7 MB of activations per token (estimate)")
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

    from gist_core.gradients import length_batches, projected_gradients, reference_gradients, trainable_linears

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("CUDA is not available; use --device cpu --tiny for a CPU smoke test")
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)
    if not cuda:
        torch.set_num_threads(min(2, torch.get_num_threads()))
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    autocast = (lambda: torch.autocast("cuda", dtype=dtype)) if cuda and dtype != torch.float32 \
        else contextlib.nullcontext

    where = torch.cuda.get_device_name(device) if cuda else machine_line()
    print(f"# gpu_feature_pass: {where}; torch {torch.__version__}; arch {args.arch} "
          f"(layers {args.layers or 'as configured'}); autocast {dtype}")
    cfg = make_config(args.arch, args.layers)
    t0 = time.perf_counter()
    model, n_base = lora_model(cfg, r=args.r, alpha=args.alpha, seed=args.seed, device=device)
    layout, _ = trainable_linears(model)
    D = layout.dim
    sync()
    print(f"model: {n_base:,} parameters ({cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, vocab "
          f"{cfg.vocab_size}), LoRA r={args.r} alpha={args.alpha} on q/k/v/o: D={D:,} in {len(layout.blocks)} "
          f"blocks; built in {time.perf_counter() - t0:.1f}s", flush=True)
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
                loss = model(input_ids=b.input_ids.to(device), attention_mask=b.attention_mask.to(device),
                             labels=b.labels.to(device)).loss
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
    print(f"{len(cands)} candidates of {args.min_len}-{args.max_len} tokens: {tokens:,} tokens in {len(batches)} "
          f"batches of <= {args.max_tokens} tokens", flush=True)
    model.eval()
    # Warm-up (kernels, allocator) on the longest batch, then reset the peak-memory counter.
    feat_on(units[-1], three); train_on(units[-1]); ref_on(units[-1][:1], one)
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)

    names = ["train step", "feature k=16", "feature k=48", "feature k=16 checkpointed"]
    fns = {"train step": train_on, "feature k=16": lambda u: feat_on(u, one), "feature k=48": lambda u: feat_on(u, three),
           "feature k=16 checkpointed": lambda u: feat_on(u, one, checkpointing=True)}
    peak = {}
    totals = {v: [] for v in names}
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
    ref_totals = {"reference bs=1": [], "feature k=16": []}
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
        print(f"  reference rep {rep + 1}/{args.repeats}: " + ", ".join(f"{v} {acc[v]:.2f}s" for v in acc),
              flush=True)

    # Sanity (not timing): ours vs the reference on two short examples, same autocast.
    check = sorted(subset, key=lambda e: len(e.input_ids))[:2]
    z, _, _, check_stats = projected_gradients(model, check, one, **kw)
    zr = reference_projected(check, one)
    err = float(np.max(np.abs(z - zr)) / max(1e-12, float(np.max(np.abs(zr)))))

    med = {v: statistics.median(xs) for v, xs in totals.items()}
    rmed = {v: statistics.median(xs) for v, xs in ref_totals.items()}
    rows = [{"variant": v, "seconds": f"{med[v]:.2f}", "examples/s": f"{len(cands) / med[v]:,.1f}",
             "tokens/s": f"{tokens / med[v]:,.0f}",
             "peak GPU memory GiB": f"{peak[v] / 2**30:.1f}" if v in peak else "-"} for v in names]
    rows += [{"variant": f"{v} (subset of {len(subset)})", "seconds": f"{rmed[v]:.2f}",
              "examples/s": f"{len(subset) / rmed[v]:,.1f}", "tokens/s": f"{sub_tokens / rmed[v]:,.0f}",
              "peak GPU memory GiB": f"{peak[v] / 2**30:.1f}" if v in peak and v.startswith("ref") else "-"}
             for v in ref_totals]
    print(f"\nThroughput (median of {args.repeats} interleaved repeats)")
    print(table(rows))
    a = med["train step"] / med["feature k=16"]
    b = (rmed["reference bs=1"] / len(subset)) / (med["feature k=16"] / len(cands))
    b_same = rmed["reference bs=1"] / rmed["feature k=16"]
    c = med["feature k=48"] / med["feature k=16"]
    print("\nRATIOS")
    print(table([
        {"ratio": "a. feature / train-step tokens/s", "value": f"{a:.3f}", "goal (CPU bench)": ">= 0.9"},
        {"ratio": "b. speedup per example over the bs=1 reference", "value": f"{b:.2f}x",
         "goal (CPU bench)": ">= 1.9x"},
        {"ratio": f"   (same {len(subset)}-example subset for both)", "value": f"{b_same:.2f}x",
         "goal (CPU bench)": "-"},
        {"ratio": "c. time k=48 / k=16", "value": f"{c:.3f}", "goal (CPU bench)": "<= 1.15"},
        {"ratio": "gradient checkpointing: time / without", "value":
         f"{med['feature k=16 checkpointed'] / med['feature k=16']:.3f}", "goal (CPU bench)": "-"},
    ] + ([{"ratio": "gradient checkpointing: peak GPU memory / without", "value":
           f"{peak['feature k=16 checkpointed'] / peak['feature k=16']:.3f}", "goal (CPU bench)": "-"}]
         if cuda else [])))
    print(f"check: projected_gradients vs the bs=1 reference @ basis, relative max error {err:.1e} "
          f"({'bf16 autocast' if dtype == torch.bfloat16 else 'float32'}; output layer on "
          f"{'completion positions only' if check_stats.completion_only_logits else 'all positions'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
