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
