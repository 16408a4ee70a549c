"""Matplotlib for the report and the evaluation's ROC figure: the non-interactive backend, and
figures as PNG bytes. matplotlib is an optional extra (`corevital[report]`): without it, one
sentence says how to install it."""

from __future__ import annotations

import io


def pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit(
            "corevital: error: the report needs matplotlib: pip install 'corevital[report]' (./scripts/run installs it)"
        ) from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png(fig) -> bytes:
    """The figure as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    pyplot().close(fig)
    return buf.getvalue()
