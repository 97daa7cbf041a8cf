"""Small PNG plots embedded in Dagster markdown metadata."""

import base64
import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import dagster as dg
import numpy as np


def _figure(panels: int = 0):
    """(pyplot, figure, axes): one axes, or a row of ``panels`` of them."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if panels:
        fig, axes = plt.subplots(1, panels, figsize=(3.2 * panels, 3), dpi=80, squeeze=False)
        return plt, fig, list(axes[0])
    fig, ax = plt.subplots(figsize=(5, 3), dpi=80)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    fig.tight_layout()
    return _save(plt, fig)


def _save(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _png_md(png: bytes, title: str) -> dg.MetadataValue:
    return dg.MetadataValue.md(f"**{title}**\n\n![{title}](data:image/png;base64,{base64.b64encode(png).decode()})")


def _to_md(plt, fig, title: str) -> dg.MetadataValue:
    return _png_md(_png(plt, fig), title)


@dataclass
class Figure:
    png: bytes
    markdown: dg.MetadataValue


def budget_plot(summary: list[dict]) -> Figure:
    """Mean held-out loss (error bars: std over seeds) against selection size, one panel per target and a
    line per method; base and full_pool, which have no budget, are horizontal lines."""
    targets = sorted({r["target"] for r in summary})
    plt, fig, axes = _figure(max(1, len(targets)))
    for ax, target in zip(axes, targets, strict=False):
        rows = [r for r in summary if r["target"] == target]
        for method in sorted({r["method"] for r in rows if r["budget"] is not None}):
            pts = sorted(
                (r["train_examples"], r["mean_loss"], r["std_loss"] or 0.0)
                for r in rows
                if r["method"] == method and r["budget"] is not None
            )
            ax.errorbar(
                [p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts], marker="o", capsize=2, label=method
            )
        for r in rows:
            if r["budget"] is None:
                ax.axhline(r["mean_loss"], linestyle=":" if r["method"] == "base" else "--", color="gray")
                ax.annotate(r["method"], (0, r["mean_loss"]), xycoords=("axes fraction", "data"), fontsize=6)
        ax.set_xscale("log")
        ax.set_title(target, fontsize=8)
        ax.set_xlabel("selected examples (budget)", fontsize=7)
    axes[0].set_ylabel("held-out loss (mean over seeds)", fontsize=7)
    axes[0].legend(fontsize=6)
    title = "Held-out loss after fine-tuning against budget (lower is better)"
    png = _png(plt, fig)
    return Figure(png, _png_md(png, title))


def line_plot(values: Sequence[float], title: str, xlabel: str, ylabel: str) -> dg.MetadataValue:
    plt, fig, ax = _figure()
    ax.plot(range(1, len(values) + 1), list(values))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    return _to_md(plt, fig, title)


def spectrum_plot(spectra: Mapping[str, Sequence[float] | np.ndarray], ks: dict[str, int]) -> dg.MetadataValue:
    """Cumulative energy of the singular values per basis, with the chosen k marked."""
    import numpy as np

    plt, fig, ax = _figure()
    for name, values in spectra.items():
        s = np.asarray(values)
        cum = np.cumsum(s**2) / max(float(np.sum(s**2)), 1e-30)
        ax.plot(range(1, len(s) + 1), cum, label=name)
        ax.axvline(ks[name], linestyle=":", color=ax.lines[-1].get_color())
    ax.set_xlabel("rank")
    ax.set_ylabel("cumulative energy")
    ax.legend(fontsize=6)
    return _to_md(plt, fig, "Spectrum (cumulative energy; dotted: chosen k)")


def histogram(
    edges: np.ndarray, counts: np.ndarray, title: str, cuts: Mapping[str, float] | None = None
) -> dg.MetadataValue:
    """A histogram from its bin edges and counts (counted where the values are, e.g. in DuckDB), with a
    dashed line at each named cut."""
    plt, fig, ax = _figure()
    if len(counts):
        ax.stairs(counts, edges, fill=True)
    for i, (name, cut) in enumerate(sorted((cuts or {}).items(), key=lambda kv: -kv[1])):
        ax.axvline(cut, color=f"C{i + 1}", linestyle="--", label=f"cut {name}")
    if cuts:
        ax.legend(fontsize=7)
    ax.set_xlabel("score")
    # Fixed margins: tight_layout doubled the time of this plot, drawn for every target at every selection.
    fig.subplots_adjust(left=0.12, right=0.97, bottom=0.17, top=0.95)
    return _png_md(_save(plt, fig), title)


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
