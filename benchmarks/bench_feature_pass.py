"""Throughput of the candidate feature pass (``gist_core.gradients.projected_gradients``).

On tiny random-weight Llama models (LoRA r=8 on q/k/v/o, LoRA weights perturbed to
non-zero as after warmup) and synthetic candidates (random token ids, lengths 20-120,
a random 20-80% prompt share masked out of the loss), three comparisons:

a. feature pass vs the fairest plain step: a LoRA training step (forward + backward of
   the batch-mean loss, no optimizer step, no per-example work) over the same length
   batches that, like the feature pass, runs the output layer on completion positions
   only (``completion_losses(...).mean().backward()``). Ratio = feature tokens/s /
   training-step tokens/s; goal >= 0.95. Extra row: against the plain step that computes
   logits at every position (``model(..., labels=...).loss.backward()``).
b. feature pass vs the reference approach: batch size 1, the full LoRA gradient
   concatenated (``reference_gradients``), then multiplied by the projection, both on
   the same examples (the first 200 candidates, each in its own length batches);
   speedup = reference time / feature-pass time; goals 2.5x (~1M model), 1.9x (~6M).
   Extra row: the reference's time per example on the subset over the feature pass's
   per example on all candidates (larger batches).
c. one target vs three targets: basis D x 16 vs D x 48; time ratio; goal <= 1.15.

Batches: ``length_batches`` (a DP split of the length-sorted order, padding <= 5%); the
padding share (padding / all tokens of the batches) of it and of the previous greedy
split is printed for the benchmark pool, the embedded default pool and a long-tailed
(lognormal) pool. Correctness (not timing): every candidate's features against
``reference_gradients @ basis`` in float32, relative max error goal <= 1e-5.

Timing is interleaved at the granularity of one length batch: for every batch the
variants run back to back in an order that rotates with the batch and the repeat
(each feature-pass run is a full ``projected_gradients`` call on that batch's
examples, setup included). A variant's time is the sum over batches of its median
over repeats, so a burst of background load during one repeat does not decide the
result; every repeat's total and the CPUs used by other processes are printed too.
torch uses 2 threads (``--threads``). With 2 threads on 2 cores, another busy
process slows small ops many-fold (each parallel region waits for a descheduled
thread). So a batch's group of runs taken while other processes used more than
0.3 CPUs (``--quiet-threshold``) is discarded and redone once the machine is quiet
(waiting at most ``--max-wait`` seconds in all); the table shows the other processes'
CPU use during the kept runs.

Both the training step and the feature pass run in eval mode (LoRA dropout 0).

    .venv/bin/python benchmarks/bench_feature_pass.py           # both models, 1000 candidates
    .venv/bin/python benchmarks/bench_feature_pass.py --quick   # smoke: 120 candidates, 1 repeat
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    BackgroundLoad,
    add_wait_quiet,
    lora_model,
    machine_line,
    median,
    orthonormal_basis,
    spread,
    synthetic_candidates,
    table,
    wait_for_quiet,
)

MODELS = {
    # ~1M parameters: the embedded default's shape
    "llama-1M": dict(
        vocab_size=2048,
        hidden_size=128,
        intermediate_size=352,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=4,
    ),
    # ~6M parameters
    "llama-6M": dict(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=704,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
    ),
}
SPEEDUP_GOAL = {"llama-1M": 2.5, "llama-6M": 1.9}


def build(name: str, r: int, seed: int):
    from transformers import LlamaConfig

    from gist_core.gradients import trainable_linears

    cfg = LlamaConfig(**MODELS[name], max_position_embeddings=256, tie_word_embeddings=True)
    model, n_base = lora_model(cfg, r=r, seed=seed)
    layout, _ = trainable_linears(model)
    return model, n_base, layout


def run_model(name: str, args, log) -> dict:
    import numpy as np
    import torch

    from gist_core.gradients import (
        completion_losses,
        length_batches,
        projected_gradients,
        reference_gradients,
        split_causal_lm,
    )

    model, n_base, layout = build(name, args.r, args.seed)
    vocab = MODELS[name]["vocab_size"]
    D = layout.dim
    cands = synthetic_candidates(args.candidates, vocab, 20, 120, seed=args.seed)
    # One D x 16 basis per target; three targets side by side = D x 48.
    bases = [orthonormal_basis(D, 16, seed=args.seed + 10 + t) for t in range(3)]
    one, three = bases[0], torch.cat(bases, dim=1).contiguous()
    kw = dict(max_tokens=args.max_tokens, max_batch_size=args.max_batch_size)
    cpu = torch.device("cpu")

    def train_on(exs):
        """One plain LoRA training step per batch of ``exs`` (a single batch here)."""
        t0 = time.perf_counter()
        for b in length_batches(exs, args.max_tokens, args.max_batch_size):
            model.zero_grad(set_to_none=True)
            loss = model(input_ids=b.input_ids, attention_mask=b.attention_mask, labels=b.labels).loss
            loss.backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt

    parts = split_causal_lm(model)

    def train_completion_on(exs):
        """The same step with the output layer on completion positions only, as the feature pass does."""
        t0 = time.perf_counter()
        for b in length_batches(exs, args.max_tokens, args.max_batch_size):
            model.zero_grad(set_to_none=True)
            completion_losses(parts, b.input_ids, b.attention_mask, b.labels).mean().backward()
        dt = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        return dt

    def feat_on(exs, basis):
        t0 = time.perf_counter()
        projected_gradients(model, exs, basis, device=cpu, **kw)
        return time.perf_counter() - t0

    def ref_on(exs, basis):
        t0 = time.perf_counter()
        G = reference_gradients(model, exs)
        G @ basis.numpy()
        return time.perf_counter() - t0

    batches = list(length_batches(cands, args.max_tokens, args.max_batch_size))
    units = [[cands[i] for i in b.indices] for b in batches]
    tokens = sum(b.n_tokens for b in batches)
    padded = sum(b.input_ids.numel() for b in batches)
    log(
        f"{name}: {n_base:,} parameters, LoRA r={args.r} on q/k/v/o: D={D:,} in {len(layout.blocks)} blocks; "
        f"{len(cands)} candidates, {tokens:,} tokens ({padded:,} with padding) in {len(batches)} batches "
        f"of <= {args.max_tokens} tokens"
    )

    # Warm up every code path once (allocator, kernels) before timing.
    train_on(units[-1])
    train_completion_on(units[-1])
    feat_on(units[-1], one)
    feat_on(units[-1], three)
    ref_on(units[-1][:2], one)
    model.eval()

    # a + c: per batch, train step / feature k=16 / feature k=48 back to back, rotating order.
    variants = {
        "train step": lambda u: train_on(u),
        "feature k=16": lambda u: feat_on(u, one),
        "feature k=48": lambda u: feat_on(u, three),
        "train step, completion logits": lambda u: train_completion_on(u),
    }
    per_batch = interleave_batches(units, variants, args.repeats, "", log, args)

    # b: reference (bs=1, full gradient, then projection) vs ours on the same subset.
    subset = cands[: args.subset]
    sub_batches = list(length_batches(subset, args.max_tokens, args.max_batch_size))
    sub_units = [[subset[i] for i in b.indices] for b in sub_batches]
    sub_tokens = sum(b.n_tokens for b in sub_batches)
    ref_variants = {"reference bs=1": lambda u: ref_on(u, one), "feature k=16": lambda u: feat_on(u, one)}
    ref_per_batch = interleave_batches(sub_units, ref_variants, args.ref_repeats, "reference ", log, args)

    # Correctness (not timing): every candidate against the bs=1 reference, float32, in chunks.
    z, norms, _, _ = projected_gradients(model, cands, one, device=cpu, **kw)
    zr = np.zeros_like(z)
    nr = np.zeros_like(norms)
    for start in range(0, len(cands), 100):
        G = reference_gradients(model, cands[start : start + 100])
        zr[start : start + 100] = G @ one.numpy()
        nr[start : start + 100] = np.linalg.norm(G.astype(np.float64), axis=1)
    err = float(np.max(np.abs(z - zr)) / max(1e-12, float(np.max(np.abs(zr)))))
    row_err = float(np.max(np.linalg.norm(z - zr, axis=1) / np.maximum(1e-12, np.linalg.norm(zr, axis=1))))
    norm_err = float(np.max(np.abs(norms - nr) / nr))

    return {
        "name": name,
        "params": n_base,
        "D": D,
        "blocks": len(layout.blocks),
        "candidates": len(cands),
        "tokens": tokens,
        "padded": padded,
        "batches": len(batches),
        **summarize(per_batch, ""),
        "subset": len(subset),
        "sub_tokens": sub_tokens,
        "sub_padded": sum(b.input_ids.numel() for b in sub_batches),
        "sub_batches": len(sub_batches),
        **summarize(ref_per_batch, "ref_"),
        "check_err": err,
        "check_row_err": row_err,
        "check_norm_err": norm_err,
    }


def padding_rows(args) -> list[dict]:
    """Padding share of the DP split and of the previous greedy one on three pools."""
    import numpy as np

    from gist_core.data import IGNORE_INDEX, Encoded, encode_messages, tulu_segments
    from gist_core.gradients import greedy_length_batches, length_batches
    from gist_demo import synthetic, tiny_model

    n = args.candidates
    texts = ["".join(s for s, _ in tulu_segments(c, tiny_model.EOS)) for c in synthetic.pretraining_corpus()]
    tokenizer = tiny_model.train_bpe_tokenizer(texts, vocab_size=2048)
    # The embedded default (4000 records): one file, so one shard, per skill, as candidate_pool shards it.
    by_skill: dict[str, list] = {}
    for r in synthetic.generate_pool(4000, seed=args.seed):
        by_skill.setdefault(r["dataset"], []).append(encode_messages(tokenizer, r["messages"], 256))
    rng = np.random.default_rng(args.seed)
    lengths = np.clip(rng.lognormal(np.log(80), 0.9, n).astype(int), 4, 2048)
    long_tailed = [
        Encoded(list(range(3, m + 3)), [IGNORE_INDEX] * (m // 2) + list(range(3, m - m // 2 + 3)), False)
        for m in lengths
    ]
    bench = synthetic_candidates(n, 2048, 20, 120, seed=args.seed)
    pools = {
        "benchmark (uniform 20-120)": [bench],
        f"benchmark subset ({args.subset})": [bench[: args.subset]],
        f"embedded default, {len(by_skill)} per-skill shards": list(by_skill.values()),
        "long-tailed (lognormal, median 80, sigma 0.9)": [long_tailed],
    }
    rows = []
    for name, shards in pools.items():
        got = {}
        pool = [e for shard in shards for e in shard]
        for split, fn in (("greedy", greedy_length_batches), ("dp", length_batches)):
            bs = [b for shard in shards for b in fn(shard, args.max_tokens, args.max_batch_size)]
            real, padded = sum(b.n_tokens for b in bs), sum(b.input_ids.numel() for b in bs)
            got[split] = (len(bs), 1 - real / padded)
        ok = got["dp"][1] < 0.05
        mean_len = np.mean([len(e.input_ids) for e in pool])
        rows.append(
            {
                "pool": name,
                "examples": len(pool),
                "tokens/example": f"{mean_len:.1f}",
                "max length": max(len(e.input_ids) for e in pool),
                "batches greedy / dp": f"{got['greedy'][0]} / {got['dp'][0]}",
                "padding greedy (before)": f"{got['greedy'][1]:.1%}",
                "padding dp (now)": f"{got['dp'][1]:.1%}",
                "goal": "< 5%",
                "met": "met" if ok else "NOT met",
            }
        )
    return rows


def interleave_batches(units, variants, repeats, label, log, args):
    """times[variant][batch][repeat]: every batch runs every variant back to back, in an order
    that rotates with the batch and the repeat. A batch's group of variants that ran while other
    processes used more than ``args.quiet_threshold`` CPUs is discarded and redone once the
    machine is quiet again (waiting at most ``args.max_wait`` seconds in all)."""
    names = list(variants)
    times = {v: [[] for _ in units] for v in names}
    loads, redone = [], 0
    for rep in range(repeats):
        acc = dict.fromkeys(names, 0.0)
        rep_busy = rep_secs = 0.0
        for j, u in enumerate(units):
            shift = (rep + j) % len(names)
            while True:
                got = {}
                with BackgroundLoad() as bg:
                    t0 = time.perf_counter()
                    for v in names[shift:] + names[:shift]:
                        got[v] = variants[v](u)
                    secs = time.perf_counter() - t0
                if bg.value <= args.quiet_threshold or args.waited >= args.max_wait:
                    break
                redone += 1
                t0 = time.perf_counter()
                wait_for_quiet(args.max_wait - args.waited, args.quiet_threshold, log=lambda s: None)
                args.waited += time.perf_counter() - t0
            for v, dt in got.items():
                times[v][j].append(dt)
                acc[v] += dt
            rep_busy += bg.value * secs
            rep_secs += secs
        loads.append(rep_busy / max(rep_secs, 1e-9))
        log(
            f"  {label}rep {rep + 1}/{repeats}: "
            + ", ".join(f"{v} {acc[v]:.2f}s" for v in names)
            + f"  (other processes: {loads[-1]:.2f} CPUs in the kept runs)"
        )
    if redone:
        log(
            f"  {label}{redone} batch group(s) redone because other processes were busy "
            f"(waited {args.waited:.0f}s so far)"
        )
    return {"times": times, "loads": loads, "redone": redone}


def summarize(per_batch, prefix):
    """Headline seconds per variant = sum over batches of the median over repeats (robust to a
    repeat that overlapped a burst of background load); also each repeat's total."""
    times = per_batch["times"]
    return {
        prefix + "med": {v: sum(median(reps) for reps in per) for v, per in times.items()},
        prefix + "totals": {
            v: [sum(per[j][r] for j in range(len(per))) for r in range(len(per[0]))] for v, per in times.items()
        },
        prefix + "loads": per_batch["loads"],
        prefix + "redone": per_batch["redone"],
    }


def met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke mode: 120 candidates, subset 30, 1 repeat")
    p.add_argument("--models", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    p.add_argument("--candidates", type=int, default=None, help="synthetic candidates (default 1000)")
    p.add_argument("--subset", type=int, default=None, help="candidates for the bs=1 reference (default 200)")
    p.add_argument("--repeats", type=int, default=None, help="interleaved repeats for a/c (default 3)")
    p.add_argument("--ref-repeats", type=int, default=None, help="interleaved repeats for b (default 3)")
    p.add_argument("--r", type=int, default=8, help="LoRA rank")
    p.add_argument("--max-tokens", type=int, default=4096, help="token budget per batch (the default compute config)")
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--quiet-threshold",
        type=float,
        default=0.3,
        metavar="CPUS",
        help="redo a batch's group of runs if other processes used more CPUs than this (default 0.3)",
    )
    p.add_argument(
        "--max-wait",
        type=float,
        default=None,
        metavar="S",
        help="total seconds to wait for a quiet machine before accepting loaded runs (default 1800, quick 60)",
    )
    add_wait_quiet(p)
    args = p.parse_args(argv)
    args.candidates = args.candidates or (120 if args.quick else 1000)
    args.subset = min(args.candidates, args.subset or (30 if args.quick else 200))
    args.repeats = args.repeats or (1 if args.quick else 3)
    args.ref_repeats = args.ref_repeats or (1 if args.quick else 3)
    args.max_wait = args.max_wait if args.max_wait is not None else (60 if args.quick else 1800)
    args.waited = 0.0

    import torch

    torch.set_num_threads(args.threads)
    print(f"# bench_feature_pass: {machine_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    pad_rows = padding_rows(args)
    results = [run_model(m, args, lambda s: print(s, flush=True)) for m in args.models]

    print(
        "\nPadding share (padding tokens / all tokens of the batches), token budget "
        f"{args.max_tokens}, at most {args.max_batch_size} examples a batch"
    )
    print(table(pad_rows))

    print("\nModels")
    print(
        table(
            [
                {
                    "model": r["name"],
                    "parameters": f"{r['params']:,}",
                    "LoRA": f"r={args.r} q/k/v/o",
                    "LoRA dim D": f"{r['D']:,}",
                    "blocks": r["blocks"],
                    "candidates": r["candidates"],
                    "tokens": f"{r['tokens']:,}",
                    "batches": r["batches"],
                    "padding share": f"{1 - r['tokens'] / r['padded']:.1%}",
                    f"subset ({r['subset']}) batches": r["sub_batches"],
                    "subset padding share": f"{1 - r['sub_tokens'] / r['sub_padded']:.1%}",
                }
                for r in results
            ]
        )
    )

    print(
        f"\na/c. Throughput over all candidates: seconds = sum over batches of the median of "
        f"{args.repeats} interleaved repeats; min-max of the repeats' totals; other processes' CPU use"
    )
    rows = []
    for r in results:
        for v, xs in r["totals"].items():
            secs = r["med"][v]
            rows.append(
                {
                    "model": r["name"],
                    "variant": v,
                    "seconds": f"{secs:.2f}",
                    "repeat totals": spread(xs),
                    "tokens/s": f"{r['tokens'] / secs:,.0f}",
                    "examples/s": f"{r['candidates'] / secs:,.1f}",
                    "background CPUs": "/".join(f"{x:.2f}" for x in r["loads"]),
                }
            )
    print(table(rows))

    print(
        f"\nb. Reference (bs=1, full gradient, then projection) on a subset vs the feature pass, per example "
        f"(per-batch medians of {args.ref_repeats} interleaved repeats, summed)"
    )
    rows = []
    for r in results:
        for v, xs in r["ref_totals"].items():
            secs = r["ref_med"][v]
            rows.append(
                {
                    "model": r["name"],
                    "variant": v,
                    "examples": r["subset"],
                    "tokens/example": f"{r['sub_tokens'] / r['subset']:.1f}",
                    "seconds": f"{secs:.2f}",
                    "repeat totals": spread(xs),
                    "ms/example": f"{1000 * secs / r['subset']:.2f}",
                    "tokens/s": f"{r['sub_tokens'] / secs:,.0f}",
                    "background CPUs": "/".join(f"{x:.2f}" for x in r["ref_loads"]),
                }
            )
        secs = r["med"]["feature k=16"]
        rows.append(
            {
                "model": r["name"],
                "variant": "feature k=16, all candidates (a/c)",
                "examples": r["candidates"],
                "tokens/example": f"{r['tokens'] / r['candidates']:.1f}",
                "seconds": f"{secs:.2f}",
                "repeat totals": spread(r["totals"]["feature k=16"]),
                "ms/example": f"{1000 * secs / r['candidates']:.2f}",
                "tokens/s": f"{r['tokens'] / secs:,.0f}",
                "background CPUs": "/".join(f"{x:.2f}" for x in r["loads"]),
            }
        )
    print(table(rows))

    print("\nRATIOS")
    rows = []
    for r in results:
        m, rm = r["med"], r["ref_med"]
        a = m["train step"] / m["feature k=16"]
        b = (rm["reference bs=1"] / r["subset"]) / (m["feature k=16"] / r["candidates"])
        b_same = rm["reference bs=1"] / rm["feature k=16"]
        c = m["feature k=48"] / m["feature k=16"]
        a_same = m["train step, completion logits"] / m["feature k=16"]
        rows += [
            {
                "model": r["name"],
                "ratio": "a. feature / train-step tokens/s",
                "baseline": "LoRA train step, same batches, completion-only logits",
                "value": f"{a_same:.3f}",
                "goal": ">= 0.95",
                "met": met(a_same >= 0.95),
            },
            {
                "model": r["name"],
                "ratio": "   (extra) feature / train-step tokens/s",
                "baseline": "LoRA train step, same batches, logits at every position",
                "value": f"{a:.3f}",
                "goal": "(>= 0.9 before)",
                "met": met(a >= 0.9),
            },
            {
                "model": r["name"],
                "ratio": "b. speedup over the bs=1 reference",
                "baseline": f"bs=1 full gradient then projection, same {r['subset']} examples",
                "value": f"{b_same:.2f}x",
                "goal": f">= {SPEEDUP_GOAL[r['name']]}x",
                "met": met(b_same >= SPEEDUP_GOAL[r["name"]]),
            },
            {
                "model": r["name"],
                "ratio": "   (extra) speedup per example",
                "baseline": f"bs=1 reference on {r['subset']} vs feature pass on all {r['candidates']}",
                "value": f"{b:.2f}x",
                "goal": "-",
                "met": "-",
            },
            {
                "model": r["name"],
                "ratio": "c. time 3 targets (k=48) / 1 target (k=16)",
                "baseline": "the feature pass with one target's basis",
                "value": f"{c:.3f}",
                "goal": "<= 1.15",
                "met": met(c <= 1.15),
            },
            {
                "model": r["name"],
                "ratio": "padding share of the batches",
                "baseline": "-",
                "value": f"{1 - r['tokens'] / r['padded']:.1%}",
                "goal": "< 5%",
                "met": met(r["tokens"] / r["padded"] > 0.95),
            },
            {
                "model": r["name"],
                "ratio": f"check: relative max error over all {r['candidates']}",
                "baseline": "reference_gradients @ basis, float32",
                "value": f"{r['check_err']:.1e}",
                "goal": "<= 1e-5",
                "met": met(r["check_err"] <= 1e-5),
            },
        ]
    print(table(rows))
    print(
        "batch groups redone because other processes were busy: "
        + ", ".join(f"{r['name']} {r['redone']} + {r['ref_redone']}" for r in results)
        + f" (waited {args.waited:.0f}s)"
    )
    print(
        "check (every candidate, float32): projected_gradients vs reference_gradients @ basis, relative max "
        "error (max |dz| / max |z|): "
        + ", ".join(f"{r['name']} {r['check_err']:.1e}" for r in results)
        + "; worst example's |dz| / |z|: "
        + ", ".join(f"{r['check_row_err']:.1e}" for r in results)
        + "; worst |g| relative error: "
        + ", ".join(f"{r['check_norm_err']:.1e}" for r in results)
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
