"""Shared helpers for the benchmark scripts (not a test module; nothing here asserts timings).

Every comparison is made side by side in one process: the variants are run in
an interleaved, rotating order over repeats and the medians are reported, so
background load on a shared machine affects all of them alike.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


# ------------------------------------------------------------------ reporting


def machine_line() -> str:
    cpu = platform.processor() or "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu}, Python {platform.python_version()}"


def table(rows: Sequence[dict], floatfmt: str = "{:.3g}") -> str:
    """A small Markdown table of dict rows (keys of the first row are the columns)."""
    if not rows:
        return "(no rows)"
    cols = list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return floatfmt.format(v)
        return str(v)

    cells = [[fmt(r.get(c, "")) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    out = [
        "| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths, strict=False)) + " |",
        "|" + "|".join("-" * (w + 2) for w in widths) + "|",
    ]
    out += ["| " + " | ".join(v.ljust(w) for v, w in zip(row, widths, strict=False)) + " |" for row in cells]
    return "\n".join(out)


def interleaved(
    variants: dict[str, Callable[[], float | None]], repeats: int, log: Callable[[str], None] | None = None
) -> dict[str, list[float]]:
    """Run each variant ``repeats`` times, rotating the order every repeat.

    A variant returns its own measured seconds, or None to be timed here
    around the whole call. Returns every measurement per variant.
    """
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for rep in range(repeats):
        shift = rep % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            got = variants[name]()
            secs = got if got is not None else time.perf_counter() - t0
            times[name].append(secs)
            if log:
                log(f"  rep {rep + 1}/{repeats} {name}: {secs:.3f}s")
    return times


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def spread(xs: Sequence[float]) -> str:
    """min-max of the repeats, for the reader to judge noise."""
    return f"{min(xs):.3g}-{max(xs):.3g}" if len(xs) > 1 else "-"


# ------------------------------------------------------------ model fixtures


def synthetic_candidates(n: int, vocab: int, min_len: int = 20, max_len: int = 120, seed: int = 0, first_id: int = 3):
    """Random token ids; a random prompt share (20-80%) masked out of the loss.

    Every example keeps at least two completion tokens so its loss is defined.
    """
    from gist_core.data import IGNORE_INDEX, Encoded

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(min_len, max_len)
        ids = [rng.randrange(first_id, vocab) for _ in range(length)]
        prompt = min(length - 2, max(1, int(length * rng.uniform(0.2, 0.8))))
        out.append(Encoded(ids, [IGNORE_INDEX] * prompt + ids[prompt:], False))
    return out


def lora_model(
    config,
    r: int = 8,
    alpha: int | None = None,
    seed: int = 0,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    device=None,
):
    """A random-weight causal LM from ``config`` with LoRA attached and the LoRA weights
    perturbed to non-zero values (as after warmup; LoRA B starts at zero otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    if device is not None and torch.device(device).type != "cpu":
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(config)
    else:
        base = AutoModelForCausalLM.from_config(config)
    return with_lora(base, r, alpha, seed, targets, device)


def with_lora(
    base,
    r: int = 8,
    alpha: int | None = None,
    seed: int = 0,
    targets: Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
    device=None,
):
    """``base`` with LoRA attached, LoRA weights perturbed to non-zero: (model, base parameter count)."""
    import torch

    from gist_core.modeling import attach_lora

    n_base = sum(p.numel() for p in base.parameters())
    model = attach_lora(base, r=r, alpha=alpha or 4 * r, dropout=0.0, target_modules=list(targets), seed=seed)
    if device is not None:
        model = model.to(device)
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=gen) * 0.02
                p.add_(noise.to(p.device, p.dtype))
    model.eval()
    return model, n_base


def orthonormal_basis(dim: int, k: int, seed: int, device=None):
    """A random D x k matrix with orthonormal columns (QR of a Gaussian), made on ``device``."""
    import torch

    device = torch.device(device or "cpu")
    g = torch.Generator(device=device).manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(dim, k, generator=g, device=device))
    return q.contiguous()


# ------------------------------------------------------------ background load


def _busy_jiffies() -> tuple[int, int]:
    """(all CPUs' non-idle jiffies, this process's + its waited-for children's jiffies)."""
    fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    vals = [int(x) for x in fields[:8]]
    busy = sum(vals) - vals[3] - vals[4]  # minus idle and iowait
    me = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    own = sum(int(x) for x in me[11:15])  # utime, stime, cutime, cstime
    return busy, own


class BackgroundLoad:
    """Average number of CPUs kept busy by *other* processes while the block ran.

    With 2 torch threads on 2 cores, any other busy process makes every parallel
    region wait for a descheduled thread; small ops then slow down many-fold. This
    number tells the reader whether a measurement was taken on a quiet machine.
    """

    def __init__(self):
        self.value = float("nan")

    def __enter__(self):
        try:
            self._b0, self._o0 = _busy_jiffies()
        except OSError:
            self._b0 = None
        self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self._b0 is None:
            return
        b1, o1 = _busy_jiffies()
        hz = os.sysconf("SC_CLK_TCK")
        secs = max(1e-9, time.perf_counter() - self._t0)
        self.value = max(0.0, ((b1 - self._b0) - (o1 - self._o0)) / hz / secs)


def wait_for_quiet(
    max_wait_s: float, threshold: float = 0.25, window_s: float = 5.0, log: Callable[[str], None] = print
) -> float:
    """Wait (at most ``max_wait_s``) until other processes use < ``threshold`` CPUs over a window."""
    deadline = time.perf_counter() + max_wait_s
    while True:
        with BackgroundLoad() as bg:
            time.sleep(window_s)
        if bg.value < threshold or time.perf_counter() >= deadline:
            log(f"background load before start: {bg.value:.2f} CPUs")
            return bg.value
        log(f"  waiting for a quiet machine (other processes use {bg.value:.2f} CPUs)")


def add_wait_quiet(parser: argparse.ArgumentParser) -> None:
    """The benchmarks' ``--wait-quiet S`` option (see ``wait_for_quiet``)."""
    parser.add_argument(
        "--wait-quiet",
        type=float,
        default=0,
        metavar="S",
        help="first wait up to S seconds for other processes to leave the CPUs idle",
    )
