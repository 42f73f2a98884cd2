"""Figures (plotly): helpers that build a figure from result rows, and one way to save them.

:func:`save_figure` always writes a self-contained HTML file (plotly.js inlined, opens offline) and
a PNG through kaleido when it finds a Chrome/Chromium browser on the machine (kaleido 1.x cannot
download one here; Debian's ``chromium`` package works). Without one it logs that the PNG was
skipped and says so in its return value; nothing fails.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

PNG_WIDTH, PNG_HEIGHT, PNG_SCALE = 900, 500, 2
# Colour-blind-safe (Okabe-Ito), in a fixed order so a text set keeps its colour across figures.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
TEXT_SET_LABELS = {"medical": "medical text", "general": "general text", "images": "image + question"}


def browser_path() -> str | None:
    """The Chrome/Chromium kaleido would use (``BROWSER_PATH`` first), or None."""
    try:
        from choreographer.browsers.chromium import Chromium

        return Chromium.find_browser(skip_local=False)
    except Exception:  # choreographer's API moved: fall back to a PATH search
        import shutil

        env = os.environ.get("BROWSER_PATH")
        if env:
            return env
        for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
            found = shutil.which(name)
            if found:
                return found
        return None


def save_figure(fig, path_without_suffix: str | os.PathLike, *, png: bool = True) -> dict:
    """Write ``fig`` as ``PATH.html`` (self-contained) and, when a browser is available, ``PATH.png``.

    Returns ``{"html": path, "png": path or None, "png_skipped": reason or None}``. Both files
    are written atomically.
    """
    from mechmed.io import atomic_path, write_text

    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    html = base.with_name(base.name + ".html")
    write_text(html, fig.to_html(include_plotlyjs=True, full_html=True))
    result = {"html": str(html), "png": None, "png_skipped": None}
    if not png:
        result["png_skipped"] = "not asked for"
        return result
    if browser_path() is None:
        reason = "no Chrome/Chromium found for kaleido (install chromium, or set BROWSER_PATH)"
        log.warning("PNG skipped for %s: %s; the HTML is written", html.name, reason)
        result["png_skipped"] = reason
        return result
    target = base.with_name(base.name + ".png")
    try:
        width = fig.layout.width or PNG_WIDTH
        height = fig.layout.height or PNG_HEIGHT
        data = fig.to_image(format="png", width=width, height=height, scale=PNG_SCALE)
    except Exception as e:  # kaleido / browser failures must not lose the results
        reason = f"kaleido failed ({(str(e).splitlines() or [type(e).__name__])[0]})"
        log.warning("PNG skipped for %s: %s; the HTML is written", html.name, reason)
        result["png_skipped"] = reason
        return result
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)
    result["png"] = str(target)
    return result


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def r2_by_layer(rows: Sequence[dict], threshold: float | None = 0.95, *, title: str | None = None):
    """R² by layer, one line per text set, with CI error bars and the threshold as a dashed line.

    ``rows`` are sae-check rows (``layer``, ``text_set``, ``r2``, optional ``r2_ci``,
    ``n_prompts``, ``exceeds_threshold``). The y axis zooms onto the data and the threshold.
    """
    import plotly.graph_objects as go

    sets = list(dict.fromkeys(r["text_set"] for r in rows))
    layers = sorted({int(r["layer"]) for r in rows})
    fig = go.Figure()
    offsets = {s: (i - (len(sets) - 1) / 2) * 0.12 for i, s in enumerate(sets)} if len(layers) > 1 else {}
    lows, highs = [], []
    for i, s in enumerate(sets):
        rs = sorted((r for r in rows if r["text_set"] == s and _finite(r.get("r2"))), key=lambda r: r["layer"])
        if not rs:
            continue
        x = [r["layer"] + offsets.get(s, 0.0) for r in rs]
        y = [r["r2"] for r in rs]
        ci = [r.get("r2_ci") or [r["r2"], r["r2"]] for r in rs]
        lo = [c[0] if _finite(c[0]) else yv for c, yv in zip(ci, y)]
        hi = [c[1] if _finite(c[1]) else yv for c, yv in zip(ci, y)]
        lows += lo
        highs += hi
        n = rs[0].get("n_prompts")
        name = TEXT_SET_LABELS.get(s, s) + (f" (n={n})" if n else "")
        colour = PALETTE[i % len(PALETTE)]
        passed = [bool(r.get("exceeds_threshold")) for r in rs]
        fig.add_trace(go.Scatter(
            x=x, y=y, name=name, mode="lines+markers", legendgroup=s, showlegend=False,
            line=dict(color=colour, width=2),
            marker=dict(size=9, color=[colour if p else "white" for p in passed], line=dict(color=colour, width=2),
                        symbol="circle"),
            error_y=dict(type="data", symmetric=False, array=[h - v for h, v in zip(hi, y)],
                         arrayminus=[v - lo_ for v, lo_ in zip(y, lo)], color=colour, thickness=1.5, width=5),
            customdata=[[r["layer"], c[0], c[1], r.get("p_value"), r.get("l0")] for r, c in zip(rs, ci)],
            hovertemplate=("layer %{customdata[0]}<br>R² %{y:.4f} [%{customdata[1]:.4f}, %{customdata[2]:.4f}]"
                           "<br>p %{customdata[3]:.2g}<br>L0 %{customdata[4]:.1f}<extra>" + name + "</extra>"),
        ))
        # the legend entry: the set's line with a filled marker, whatever its first point shows
        fig.add_trace(go.Scatter(x=[None], y=[None], name=name, mode="lines+markers", legendgroup=s,
                                 line=dict(color=colour, width=2), marker=dict(size=9, color=colour)))
    if threshold is not None and _finite(threshold):
        fig.add_hline(y=threshold, line=dict(color="#B22222", dash="dash", width=1.5),
                      annotation_text=f"threshold {threshold:g}", annotation_position="bottom right",
                      annotation_font=dict(color="#B22222", size=12))
        lows.append(threshold)
        highs.append(threshold)
    if lows:
        lo, hi = min(lows), max(highs)
        pad = max(0.004, 0.08 * (hi - lo))
        fig.update_yaxes(range=[lo - pad, min(1.0, hi) + pad])
    fig.update_layout(
        title=dict(text=title or ("SAE reconstruction R² by layer<br><sup>filled marker: mean R² above the "
                                  "threshold (one-sided t test, p < 0.05); open: not shown to be above</sup>"),
                   x=0.02, font=dict(size=16)),
        template="plotly_white",
        width=PNG_WIDTH, height=PNG_HEIGHT,
        legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="center", x=0.5),
        margin=dict(l=70, r=30, t=80, b=100),
        font=dict(size=13),
    )
    fig.update_xaxes(title="decoder layer (resid_post)", tickmode="array", tickvals=layers, showgrid=False,
                     zeroline=False)
    fig.update_yaxes(title="R² (mean over prompts, 95% CI)", tickformat=".3f", zeroline=False)
    return fig
