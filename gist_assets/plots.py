"""Small PNG plots embedded in Dagster markdown metadata."""


import base64
import io
from typing import Sequence

import dagster as dg


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    return plt, fig, ax


def _to_md(plt, fig, title: str) -> dg.MetadataValue:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return dg.MetadataValue.md(f"**{title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()})")


def line_plot(values: Sequence[float], title: str, xlabel: str, ylabel: str) -> dg.MetadataValue:
    plt, fig, ax = _figure()
    ax.plot(range(1, len(values) + 1), list(values))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _to_md(plt, fig, title)


def spectrum_plot(spectra: dict[str, Sequence[float]], ks: dict[str, int]) -> dg.MetadataValue:
    """Cumulative energy of the singular values per basis, with the chosen k marked."""
    import numpy as np

    plt, fig, ax = _figure()
    for name, s in spectra.items():
        s = np.asarray(s)
        cum = np.cumsum(s ** 2) / max(float(np.sum(s ** 2)), 1e-30)
        ax.plot(range(1, len(s) + 1), cum, label=name)
        ax.axvline(ks[name], linestyle=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("rank")
    ax.set_ylabel("cumulative energy")
    ax.legend(fontsize=6)
    return _to_md(plt, fig, "Spectrum (cumulative energy; dotted: chosen k)")


def histogram(values: Sequence[float], title: str, mark: float | None = None) -> dg.MetadataValue:
    plt, fig, ax = _figure()
    ax.hist(list(values), bins=40)
    if mark is not None:
        ax.axvline(mark, color="red", linestyle="--", label="selection cut")
        ax.legend(fontsize=7)
    ax.set_xlabel("score")
    return _to_md(plt, fig, title)


def md_table(rows: list[dict], limit: int = 20) -> str:
    if not rows:
        return "(none)"
    cols = list(rows[0])
    def cell(v):
        text = f"{v:.4f}" if isinstance(v, float) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")[:120]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r[c]) for c in cols) + " |" for r in rows[:limit]]
    return "\n".join(lines)


def bar_chart(groups: dict[str, dict[str, float]], title: str, ylabel: str,
              zero_based: bool = True) -> dg.MetadataValue:
    """Grouped bars: one group per outer key (e.g. target), one bar per inner key (e.g. method).

    ``zero_based=False`` zooms the y axis onto the values (differences of a few
    hundredths in a loss of ~5 would be invisible from zero); bars carry their values.
    """
    import numpy as np

    series = list(dict.fromkeys(s for per in groups.values() for s in per))
    names = list(groups)
    plt, fig, ax = _figure()
    fig.set_size_inches(max(5, 0.45 * len(names) * max(1, len(series))), 3)
    width = 0.8 / max(1, len(series))
    x = np.arange(len(names))
    for j, s in enumerate(series):
        values = [groups[n].get(s, float("nan")) for n in names]
        bars = ax.bar(x + (j - (len(series) - 1) / 2) * width, values, width, label=s)
        ax.bar_label(bars, fmt="%.3f", fontsize=5, rotation=90, padding=2)
    finite = [v for per in groups.values() for v in per.values() if v is not None and np.isfinite(v)]
    if finite:
        lo, hi = min(finite), max(finite)
        pad = 0.25 * (hi - lo) or 0.05 * abs(hi) or 1.0
        ax.set_ylim(0 if zero_based and lo >= 0 else lo - pad, hi + 2 * pad)
    ax.set_xticks(x)
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=6, ncol=min(4, max(1, len(series))))
    return _to_md(plt, fig, title)
