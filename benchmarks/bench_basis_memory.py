"""Peak memory of building the spectral basis from target gradients larger than the budget.

G (N x D float32) is written to a temporary ``.npy`` file four times larger than the
configured memory budget. Each measurement runs in a fresh subprocess, so its peak
RSS is its own:

* ``baseline``   the interpreter with numpy and gist_core.spectral imported and BLAS
                 initialized by one small matmul (its buffers are a fixed cost), nothing else;
* ``bounded``    the pipeline's path: ``np.load(mmap_mode="r")`` + ``build_basis(G,
                 budget_bytes=budget, out=<path of V.npy>)`` (G read with positioned reads
                 into one reused chunk buffer, V streamed to the file);
* ``in-memory``  the baseline approach: ``np.load`` (whole G in RAM) + ``build_basis`` with
                 an unlimited budget, V in memory.

Peak RSS is the kernel's high-water mark (``VmHWM`` = ``ru_maxrss``); it counts the
pages of a mapped file the process has touched (``RssFile``), which are clean page
cache the kernel can drop, as well as anonymous memory (``RssAnon``). A sampling
thread records the peak of each separately (every ~1 ms, so an approximation), and
``tracemalloc`` the peak of the array buffers numpy allocates ("numpy peak").
The script asserts that the bounded basis equals the in-memory one.

    .venv/bin/python benchmarks/bench_basis_memory.py            # budget 64 MB, G 256 MB
    .venv/bin/python benchmarks/bench_basis_memory.py --quick    # budget 16 MB, G 64 MB
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import REPO, add_wait_quiet, interleaved, machine_line, median, table, wait_for_quiet  # noqa: E402

MB = 1 << 20


# --------------------------------------------------------------- child side


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    return 0


class _Sampler:
    """Peak RssAnon / RssFile by polling /proc/self/status from a thread."""

    def __init__(self, interval: float = 0.001):
        import threading

        self.interval = interval
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.sample()
            time.sleep(self.interval)

    def sample(self):
        for k in self.peak:
            self.peak[k] = max(self.peak[k], _status_kb(k))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sample()


def child(mode: str, path: str, budget: int, k: int, out: str) -> None:
    import tracemalloc

    import numpy as np

    from gist_core.spectral import build_basis

    rec: dict[str, Any] = {"mode": mode}
    tracemalloc.start()  # numpy reports its array buffers to tracemalloc
    with _Sampler() as sampler:
        t0 = time.perf_counter()
        if mode == "baseline":
            np.ones((256, 256)) @ np.ones((256, 256))  # BLAS allocates its thread buffers once
        elif mode == "bounded":
            G = np.load(path, mmap_mode="r")
            basis, _ = build_basis(G, k=k, budget_bytes=budget, out=out + ".V.npy")
        elif mode == "in-memory":
            G = np.load(path)
            basis, _ = build_basis(G, k=k, budget_bytes=1 << 62)
        else:
            raise SystemExit(f"unknown mode {mode}")
        rec["seconds"] = time.perf_counter() - t0
    rec["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / MB
    tracemalloc.stop()
    if mode == "in-memory":
        np.save(out + ".V.npy", basis.V)
    if mode != "baseline":
        np.save(out + ".s.npy", basis.s)
    import resource

    rec["vmhwm_mb"] = _status_kb("VmHWM") / 1024
    rec["ru_maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rec["peak_anon_mb"] = sampler.peak["RssAnon"] / 1024
    rec["peak_file_mb"] = sampler.peak["RssFile"] / 1024
    print("RESULT " + json.dumps(rec))


# -------------------------------------------------------------- parent side


def write_G(path: Path, n: int, d: int, seed: int = 0) -> None:
    """A low-rank-plus-noise G with a decaying, well-separated spectrum, written in row blocks."""
    import numpy as np

    rng = np.random.default_rng(seed)
    r = 24
    W = rng.standard_normal((r, d)).astype(np.float32)  # r x D directions
    A = rng.standard_normal((n, r)) * (0.7 ** np.arange(r))  # N x r decaying weights
    G = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(n, d))
    for start in range(0, n, 16):
        stop = min(n, start + 16)
        block = (A[start:stop] @ W).astype(np.float32)
        block += 0.01 * rng.standard_normal(block.shape, dtype=np.float32)
        G[start:stop] = block
    G.flush()
    del G


def run_child(mode: str, path: Path, budget: int, k: int, out: Path) -> dict:
    cmd = [
        sys.executable,
        __file__,
        "--child",
        mode,
        "--path",
        str(path),
        "--budget-bytes",
        str(budget),
        "--k",
        str(k),
        "--out",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed:\n{proc.stdout}\n{proc.stderr}")
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT ") :])


def compare_bases(a: Path, b: Path) -> tuple[float, float]:
    """Max |V_a - V_b| after aligning each column's sign, and max relative difference of s."""
    import numpy as np

    Va, Vb = np.load(str(a) + ".V.npy"), np.load(str(b) + ".V.npy")
    sa, sb = np.load(str(a) + ".s.npy"), np.load(str(b) + ".s.npy")
    signs = np.sign(np.sum(Va * Vb, axis=0))
    dv = float(np.max(np.abs(Va - Vb * signs)))
    ds = float(np.max(np.abs(sa - sb) / np.maximum(np.abs(sa), 1e-30 + sa[0] * 1e-12)))
    return dv, ds


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="budget 16 MB, G 64 MB (N=128, D=131072)")
    p.add_argument("--budget-mb", type=int, default=None, help="memory budget of build_basis (default 64)")
    p.add_argument("--n", type=int, default=None, help="target examples N (default 256)")
    p.add_argument("--ratio", type=float, default=4.0, help="size of G over the budget (default 4)")
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--repeats", type=int, default=None, help="runs of each mode, interleaved (default 3, quick 1)")
    p.add_argument("--dir", default=None, help="where to write G (default a temporary directory)")
    add_wait_quiet(p)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--budget-bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        child(args.child, args.path, args.budget_bytes, args.k, args.out)
        return 0

    budget_mb = args.budget_mb or (16 if args.quick else 64)
    n = args.n or (128 if args.quick else 256)
    d = int(args.ratio * budget_mb * MB) // (n * 4)
    repeats = args.repeats or (1 if args.quick else 3)
    budget = budget_mb * MB
    print(f"# bench_basis_memory: {machine_line()}")
    if args.wait_quiet:
        wait_for_quiet(args.wait_quiet)
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "G.npy"
        t0 = time.perf_counter()
        write_G(path, n, d)
        g_mb = path.stat().st_size / MB
        print(
            f"G: N={n} D={d} float32, {g_mb:.1f} MB on disk ({g_mb / budget_mb:.1f}x the {budget_mb} MB budget); "
            f"written in {time.perf_counter() - t0:.1f}s; k={args.k}; {repeats} run(s) per mode, interleaved"
        )
        modes = ["baseline", "bounded", "in-memory"]
        results: dict[str, list[dict]] = {m: [] for m in modes}

        def runner(mode):
            def go():
                rec = run_child(mode, path, budget, args.k, Path(tmp) / mode)
                results[mode].append(rec)
                return rec.get("seconds", 0.0)

            return go

        interleaved({m: runner(m) for m in modes}, repeats)
        dv, ds = compare_bases(Path(tmp) / "bounded", Path(tmp) / "in-memory")

    v_mb = d * args.k * 4 / MB
    base = median([r["vmhwm_mb"] for r in results["baseline"]])
    base_anon = median([r["peak_anon_mb"] for r in results["baseline"]])
    rows = []
    for m in modes:
        rs = results[m]
        hwm = median([r["vmhwm_mb"] for r in rs])
        rows.append(
            {
                "mode": m,
                "budget MB": "-" if m == "baseline" else (f"{budget_mb}" if m == "bounded" else "unlimited"),
                "G MB": "-" if m == "baseline" else f"{g_mb:.0f}",
                "peak RSS MB (VmHWM)": f"{hwm:.0f}",
                "peak - baseline MB": "-" if m == "baseline" else f"{hwm - base:.0f}",
                "peak anon MB": f"{median([r['peak_anon_mb'] for r in rs]):.0f}",
                "peak file MB": f"{median([r['peak_file_mb'] for r in rs]):.0f}",
                "numpy peak MB": f"{median([r['traced_peak_mb'] for r in rs]):.0f}",
                "build s": "-" if m == "baseline" else f"{median([r['seconds'] for r in rs]):.2f}",
            }
        )
    print()
    print(table(rows))
    bd = median([r["vmhwm_mb"] for r in results["bounded"]]) - base
    im = median([r["vmhwm_mb"] for r in results["in-memory"]]) - base
    anon_bd = median([r["peak_anon_mb"] for r in results["bounded"]]) - base_anon
    t_bd = median([r["seconds"] for r in results["bounded"]])
    t_im = median([r["seconds"] for r in results["in-memory"]])
    print()
    print(
        f"(V is {v_mb:.1f} MB; the bounded path streams it to disk. ru_maxrss of these children reads "
        f"{median([r['ru_maxrss_mb'] for r in results['baseline']]):.0f} MB even for the baseline: the kernel "
        "carries the parent's high-water mark into a forked child, so VmHWM, which exec resets, is used)"
    )
    print()
    print("RATIOS (peaks over the baseline interpreter)")
    print(f"  bounded peak RSS - budget (goal: a small constant) = {bd - budget_mb:+.1f} MB")
    print(f"  bounded peak RSS / budget                          = {bd / budget_mb:.2f}")
    print(f"  bounded peak anonymous memory / budget             = {anon_bd / budget_mb:.2f}")
    print(
        f"  bounded numpy peak / budget                        = "
        f"{median([r['traced_peak_mb'] for r in results['bounded']]) / budget_mb:.2f}"
    )
    print(f"  bounded peak RSS / in-memory peak RSS              = {bd / im:.3f}")
    print(f"  in-memory peak RSS / G size                        = {im / g_mb:.2f}")
    print(f"  build time bounded / in-memory                     = {t_bd / t_im:.2f}")
    print(f"bases agree: bounded vs in-memory max|dV| {dv:.2e}, max rel ds {ds:.2e}")
    assert dv < 1e-4 and ds < 1e-8, f"bounded and in-memory bases differ: max|dV|={dv}, rel ds={ds}"
    print("OK: the bases agree")
    return 0


if __name__ == "__main__":
    sys.exit(main())
