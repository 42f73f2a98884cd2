"""Figures (plotly): helpers that build a figure from result rows, and one way to save them.

:func:`save_figure` always writes a self-contained HTML file (plotly.js inlined, opens offline) and
a PNG through kaleido when it finds a Chrome/Chromium browser on the machine (``plotly_get_chrome``
installs one; Debian's ``chromium`` package works). Without one it says so once per run
(:func:`browser_or_warn`), keeps the figure as ``NAME.plotly.json`` beside the HTML and says so in
its return value; nothing fails. :func:`export_pending` (``mechmed report RUN_DIR --figures``) draws
those files later.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

from mechmed.config import RANGE_ARMS

log = logging.getLogger(__name__)

PNG_WIDTH, PNG_HEIGHT, PNG_SCALE = 900, 500, 2
# Colour-blind-safe (Okabe-Ito), in a fixed order so a text set keeps its colour across figures.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000")
TEXT_SET_LABELS = {"medical": "medical text", "general": "general text", "images": "image + question"}


#: ``MECHMED_BROWSER``: the Chrome/Chromium to draw PNG/SVG/PDF with, or ``none`` for HTML figures only
#: (what a machine without a browser gets).
BROWSER_ENV = "MECHMED_BROWSER"
#: Set once a run has said that it found no browser: the run's other figures, and its worker
#: processes, stay quiet.
_WARNED_ENV = "MECHMED_NO_BROWSER_WARNED"
NO_BROWSER = ("no Chrome/Chromium found, so figures are written as HTML only (no PNG/SVG/PDF). Install one "
              "with `plotly_get_chrome` (or your system's chromium package), or point BROWSER_PATH at a "
              "Chrome/Chromium binary; then `mechmed report RUN_DIR --figures` writes the missing files "
              "without rerunning anything")


def browser_path() -> str | None:
    """The Chrome/Chromium kaleido would use (``MECHMED_BROWSER``, then ``BROWSER_PATH``, then
    plotly's own download and the usual places), or None."""
    chosen = os.environ.get(BROWSER_ENV, "").strip()
    if chosen.lower() == "none":
        return None
    if chosen:
        return chosen if os.access(chosen, os.X_OK) else None
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


_SESSION = {"depth": 0, "server": False}


#: A run directory whose figures share one ``plotly.min.js`` at its top (set by :func:`shared_plotly`;
#: an environment variable, so the ablation's worker processes see it too).
SHARED_PLOTLY_ENV = "MECHMED_SHARED_PLOTLY"


@contextmanager
def shared_plotly(root: str | os.PathLike):
    """Every figure written under ``root`` inside the block loads one ``root/plotly.min.js`` (written
    once) instead of inlining its 4.6 MB: a run directory of many figures stays small. The HTML files
    then open from inside the run directory (move the directory, not a single file)."""
    before = os.environ.get(SHARED_PLOTLY_ENV)
    os.environ[SHARED_PLOTLY_ENV] = str(Path(root).resolve())
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(SHARED_PLOTLY_ENV, None)
        else:
            os.environ[SHARED_PLOTLY_ENV] = before


def _plotly_src(html: Path, shared_js: bool) -> str | bool:
    """What ``to_html(include_plotlyjs=...)`` gets: a script path relative to ``html`` (the run
    directory's copy under :func:`shared_plotly`, else its folder's with ``shared_js``), or True (inline)."""
    from mechmed.io import write_text

    root = os.environ.get(SHARED_PLOTLY_ENV)
    folder = html.parent.resolve()
    if root and (folder == Path(root) or Path(root) in folder.parents):
        js = Path(root) / "plotly.min.js"
    elif shared_js:
        js = folder / "plotly.min.js"
    else:
        return True
    if not js.is_file():
        from plotly.offline import get_plotlyjs

        write_text(js, get_plotlyjs())
    return os.path.relpath(js, folder)


@contextmanager
def png_session():
    """Keep one headless browser open for every PNG written inside the ``with`` block (kaleido's
    sync server): about 0.5 s a figure instead of 2-3 s for a browser started per figure. Nested
    blocks share the outer one; without a browser it does nothing."""
    outer = _SESSION["depth"] == 0
    _SESSION["depth"] += 1
    try:
        if outer and browser_or_warn():  # no browser: the run's one warning, said up front
            try:
                import kaleido

                kaleido.start_sync_server(silence_warnings=True)
                _SESSION["server"] = True
            except Exception as e:  # an old kaleido: fall back to a browser per figure
                log.info("kaleido sync server not started (%s); one browser per PNG", e)
        yield
    finally:
        _SESSION["depth"] -= 1
        if outer and _SESSION["server"]:
            _SESSION["server"] = False
            try:
                import kaleido

                kaleido.stop_sync_server(silence_warnings=True)
            except Exception:  # the browser is gone already
                log.debug("kaleido sync server stop failed", exc_info=True)


#: Beside a figure whose PNG could not be drawn: the figure itself, so that the PNG (and SVG/PDF) can
#: be written later (:func:`export_pending`).
FIGURE_JSON = ".plotly.json"


def browser_or_warn() -> bool:
    """True when a browser for PNG export is there; otherwise say so (:data:`NO_BROWSER`) once per
    run, the run's worker processes included, and return False."""
    if browser_path() is not None:
        return True
    if not os.environ.get(_WARNED_ENV):
        log.warning(NO_BROWSER)
        os.environ[_WARNED_ENV] = "1"
    return False


def export_pending(root: str | os.PathLike) -> list[Path]:
    """Write the PNG (and, for a report's figures, SVG and PDF) of every figure under ``root`` that was
    saved without a browser (its ``NAME.plotly.json``); returns the files written. Needs a browser."""
    import plotly.io as pio

    from mechmed.errors import MechmedError

    if browser_path() is None:
        raise MechmedError(f"--figures: {NO_BROWSER.split(', so')[0]}; install one with `plotly_get_chrome` "
                           "(or your system's chromium package) or set BROWSER_PATH, then run this again")
    written = []
    with png_session():
        for spec in sorted(Path(root).rglob("*" + FIGURE_JSON)):
            base = spec.with_name(spec.name[: -len(FIGURE_JSON)])
            vector = base.parent.name == "figures" and (base.parent.parent / "report.html").is_file()
            res = _write_images(pio.read_json(str(spec)), base, vector)
            if res.get("png"):
                spec.unlink()
                written += [Path(res[k]) for k in ("png", "svg", "pdf") if res.get(k)]
    return written


def save_figure(fig, path_without_suffix: str | os.PathLike, *, png: bool = True, shared_js: bool = False,
                vector: bool = False) -> dict:
    """Write ``fig`` as ``PATH.html`` (self-contained) and, when a browser is available, ``PATH.png``
    (and with ``vector`` ``PATH.svg`` and ``PATH.pdf`` for a paper).

    With ``shared_js`` the HTML loads ``plotly.min.js`` from its own folder (written there once)
    instead of inlining it: for folders of many figures; inside :func:`shared_plotly` figures under its
    root load the root's copy. Returns ``{"html": path, "png": path or None, "png_skipped": reason or
    None}``, with ``vector`` also ``"svg"``, ``"pdf"`` (paths, once written) and ``"vector_skipped"``
    (why not, or None). All files are written atomically.
    """
    from mechmed.io import write_text

    base = Path(path_without_suffix)
    base.parent.mkdir(parents=True, exist_ok=True)
    html = base.with_name(base.name + ".html")
    write_text(html, fig.to_html(include_plotlyjs=_plotly_src(html, shared_js), full_html=True))
    result = {"html": str(html), "png": None, "png_skipped": None, **({"vector_skipped": None} if vector else {})}
    if not png:
        result["png_skipped"] = "not asked for"
        return result
    if browser_or_warn():
        result.update(_write_images(fig, base, vector))
    else:
        result["png_skipped"] = "no Chrome/Chromium found for kaleido (install one with plotly_get_chrome, or set BROWSER_PATH)"
        log.info("PNG skipped for %s: %s; the HTML is written", html.name, result["png_skipped"])
    pending = base.with_name(base.name + FIGURE_JSON)
    if result["png"] is None:  # the figure itself, for `mechmed report --figures` once a browser is there
        write_text(pending, fig.to_json())
    elif pending.exists():
        pending.unlink()
    return result


def _write_images(fig, base: Path, vector: bool) -> dict:
    """``base.png`` (and with ``vector`` ``.svg``, ``.pdf``) through kaleido: the paths written, and
    ``png_skipped`` / ``vector_skipped`` with the reason kaleido failed."""
    from mechmed.io import atomic_path

    out: dict = {}
    width = fig.layout.width or PNG_WIDTH
    height = fig.layout.height or PNG_HEIGHT
    for fmt in ("png", "svg", "pdf") if vector else ("png",):
        try:
            with warnings.catch_warnings():  # plotly's "kopts ignored" notice under png_session
                warnings.filterwarnings("ignore", message="The kopts argument is ignored")
                data = fig.to_image(format=fmt, width=width, height=height, scale=PNG_SCALE if fmt == "png" else 1)
        except Exception as e:  # kaleido / browser failures must not lose the results
            reason = f"kaleido failed ({(str(e).splitlines() or [type(e).__name__])[0]})"
            log.warning("%s skipped for %s: %s; the HTML is written", fmt.upper(), base.name, reason)
            out["png_skipped" if fmt == "png" else "vector_skipped"] = reason
            return out
        with atomic_path(base.with_name(f"{base.name}.{fmt}")) as tmp:
            tmp.write_bytes(data)
        out[fmt] = str(base.with_name(f"{base.name}.{fmt}"))
    return out


def _finite(v) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(v)


def _type_r2(t: str):
    return lambda r: ((r.get("by_token_type") or {}).get(t) or {}).get("r2_pooled")


def _massive(key: str):
    return lambda r: (r.get("massive_dims") or {}).get(key)


#: What ``r2_by_layer(detail=True)`` draws beside the headline R², one marker per layer each:
#: (legend label, caption phrase, value of a sae-check row, marker symbol, colour); a phrase of
#: None is a token type, named together in the caption. ``{k}`` is ``massive_dims["k"]``. The
#: colours are not the text sets' (PALETTE[:3]).
R2_DETAIL_SERIES = (
    ("text tokens", None, _type_r2("text"), "triangle-up", "#56B4E9"),
    ("image tokens", None, _type_r2("image"), "square", "#D55E00"),
    ("special tokens", None, _type_r2("special"), "diamond", "#CC79A7"),
    ("without the top-{k} dims", "without the top-{k} variance dimensions", _massive("r2_without"), "x", "#000000"),
    ("dims standardised", "with every dimension divided by its std", _massive("r2_standardised"), "star",
     "#7F7F7F"),
)


def r2_by_layer(rows: Sequence[dict], threshold: float | None = 0.95, *, title: str | None = None,
                detail: bool = False):
    """R² by layer, one line per text set, with CI error bars and the threshold as a dashed line.

    ``rows`` are sae-check rows (``layer``, ``text_set``, ``r2``, optional ``r2_ci``,
    ``n_prompts``, ``exceeds_threshold``). The y axis zooms onto the data and the threshold.

    With ``detail`` each text set gets its own panel, and beside its line (the mean R² over prompts)
    one marker per layer for each of :data:`R2_DETAIL_SERIES` the rows hold: the pooled R² over the
    text, image and special tokens (``by_token_type``), and the pooled R² without the top-k variance
    dimensions and with every dimension standardised (``massive_dims``); the title names what is drawn.
    """
    if detail:
        return _r2_detail(rows, threshold, title)
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


def _r2_detail(rows: Sequence[dict], threshold: float | None, title: str | None):
    """:func:`r2_by_layer` with ``detail``: a panel per text set, the extra series as markers."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    sets = list(dict.fromkeys(r["text_set"] for r in rows))
    layers = sorted({int(r["layer"]) for r in rows})
    ks = {(r.get("massive_dims") or {}).get("k") for r in rows} - {None}
    k = ks.pop() if len(ks) == 1 else "k"
    by_set = {s: sorted((r for r in rows if r["text_set"] == s), key=lambda r: r["layer"]) for s in sets}
    titles = []
    for s in sets:
        n = next((r.get("n_prompts") for r in by_set[s] if r.get("n_prompts")), None)
        titles.append(TEXT_SET_LABELS.get(s, s) + (f" (n={n})" if n else ""))
    fig = make_subplots(rows=1, cols=max(1, len(sets)), shared_yaxes=True, subplot_titles=titles,
                        horizontal_spacing=0.04)
    # the line on the layer's tick, token types to its left, the massive-dimension numbers to its right
    offsets = (0.0, -0.3, -0.2, -0.1, 0.12, 0.24)
    values, drawn = [], []
    for col, s in enumerate(sets, start=1):
        rs = [r for r in by_set[s] if _finite(r.get("r2"))]
        colour = PALETTE[(col - 1) % len(PALETTE)]
        if rs:
            y = [r["r2"] for r in rs]
            ci = [r.get("r2_ci") or [r["r2"], r["r2"]] for r in rs]
            lo = [c[0] if _finite(c[0]) else v for c, v in zip(ci, y)]
            hi = [c[1] if _finite(c[1]) else v for c, v in zip(ci, y)]
            values += lo + hi
            passed = [bool(r.get("exceeds_threshold")) for r in rs]
            fig.add_trace(go.Scatter(
                x=[r["layer"] + offsets[0] for r in rs], y=y, name=titles[col - 1], legendgroup=s, legendrank=col,
                mode="lines+markers", line=dict(color=colour, width=2),
                marker=dict(size=9, color=[colour if p else "white" for p in passed], line=dict(color=colour, width=2)),
                error_y=dict(type="data", symmetric=False, array=[h - v for h, v in zip(hi, y)],
                             arrayminus=[v - lo_ for v, lo_ in zip(y, lo)], color=colour, thickness=1.5, width=4),
                customdata=[[r["layer"], c[0], c[1], r.get("r2_pooled")] for r, c in zip(rs, ci)],
                hovertemplate=("layer %{customdata[0]}<br>mean R² over prompts %{y:.4f} [%{customdata[1]:.4f}, "
                               "%{customdata[2]:.4f}]<br>pooled R² %{customdata[3]:.4f}<extra></extra>"),
            ), row=1, col=col)
        for i, (label, _, get, symbol, mcolour) in enumerate(R2_DETAIL_SERIES, start=1):
            pts = [(r["layer"], get(r)) for r in by_set[s] if _finite(get(r))]
            if not pts:
                continue
            label = label.format(k=k)
            values += [v for _, v in pts]
            fig.add_trace(go.Scatter(
                x=[L + offsets[i] for L, _ in pts], y=[v for _, v in pts], name=label, legendgroup=label,
                mode="markers", showlegend=label not in drawn, legendrank=100 + i,
                marker=dict(size=8, symbol=symbol, color=mcolour, line=dict(color=mcolour, width=1)),
                customdata=[[L] for L, _ in pts],
                hovertemplate="layer %{customdata[0]}<br>" + label + " R² %{y:.4f}<extra></extra>",
            ), row=1, col=col)
            if label not in drawn:
                drawn.append(label)
    if threshold is not None and _finite(threshold):
        fig.add_hline(y=threshold, line=dict(color="#B22222", dash="dash", width=1.5), row="all", col="all")
        values.append(threshold)
        fig.add_annotation(text=f"threshold {threshold:g}", xref="paper", x=1.0, xanchor="right", yref="y",
                           y=threshold, yanchor="top", showarrow=False, font=dict(color="#B22222", size=12))
    if values:
        lo, hi = min(values), max(values)
        pad = max(0.004, 0.06 * (hi - lo))
        fig.update_yaxes(range=[lo - pad, min(1.0, hi) + pad])
    shown = [(label.format(k=k), phrase) for label, phrase, *_ in R2_DETAIL_SERIES if label.format(k=k) in drawn]
    types = [label.removesuffix(" tokens") for label, phrase in shown if phrase is None]
    parts = ["pooled R² over " + " / ".join(types) + " tokens"] if types else []
    parts += ["pooled R² " + phrase.format(k=k) for _, phrase in shown if phrase is not None]
    sub = "lines: mean R² over prompts, 95% CI (filled marker: above the threshold, one-sided t test p < 0.05)"
    if parts:
        sub += "<br>markers: " + "; ".join(parts)
    width = max(PNG_WIDTH, 120 + 330 * len(sets))
    fig.update_layout(
        title=dict(text=title or f"SAE reconstruction R² by layer<br><sup>{sub}</sup>", x=0.02, font=dict(size=16)),
        template="plotly_white", width=width, height=PNG_HEIGHT + 60, font=dict(size=13),
        legend=dict(orientation="h", yanchor="top", y=-0.16, xanchor="center", x=0.5),
        margin=dict(l=70, r=30, t=135, b=110),
    )
    fig.update_xaxes(title="decoder layer (resid_post)", tickmode="array", tickvals=layers, showgrid=False,
                     zeroline=False)
    fig.update_yaxes(tickformat=".3f", zeroline=False)
    fig.update_yaxes(title="R²", row=1, col=1)
    return fig


# ---------------------------------------------------------------- shared helpers

ARM_ORDER = ("base", "selected", "early", "middle", "late", "all", "random", "ce_only", "consistency_only", "act",
             "clamp", "steer", "ensemble")
ARM_LABELS = {"selected": "selected", "early": "early", "middle": "middle", "late": "late", "all": "all layers",
              "random": "random", "ce_only": "CE only", "consistency_only": "consistency only", "base": "base",
              "act": "activation consistency", "clamp": "SAE clamp", "steer": "steering", "ensemble": "prompt ensemble"}
METHOD_LABELS = {"lora": "LoRA", "spectral_moe": "spectral experts", "none": "no training"}
COLLAPSE_COLOUR = "#B22222"
SCORE_LABELS = {
    "gain_flipped": "flip entering at each layer (|a_L| − |a_L−1|, flipped pairs)",
    "gain_all": "effect entering at each layer (|a_L| − |a_L−1|, all pairs)",
    "attr_flipped": "mean |attribution| on flipped pairs",
    "attr_stable": "mean |attribution| on stable pairs",
    "attr_all": "mean |attribution| on all pairs",
    "patch_flipped": "mean |exact patch effect| on flipped pairs",
    "recovery_flipped": "mean recovery on flipped pairs",
    "feature_auc": "AUC of the top feature's |Δf|",
}


def layer_text(layers) -> str:
    """``[2, 3, 4]`` → ``"2–4"`` (en dash), ``[1, 3]`` → ``"1, 3"``, ``[]`` → ``""``."""
    from mechmed.sites import format_layers

    return format_layers(layers).replace("-", "–").replace(",", ", ")


def window_layers(window) -> list[int]:
    """Layer indices from a list, a select-layers / training config (dict or object with ``layers``)."""
    if window is None:
        return []
    if isinstance(window, dict):
        window = window.get("layers", [])
    elif hasattr(window, "layers"):
        window = window.layers
    return sorted({int(x) for x in window})


def _runs(layers: Sequence[int]) -> list[tuple[int, int]]:
    """Contiguous runs of sorted layer indices: [2, 3, 4, 7] → [(2, 4), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for x in layers:
        if runs and x == runs[-1][1] + 1:
            runs[-1] = (runs[-1][0], x)
        else:
            runs.append((x, x))
    return runs


def _err(values, cis):
    """Plotly asymmetric error arrays from values and [lo, hi] pairs (missing ends → no bar)."""
    plus, minus = [], []
    for v, ci in zip(values, cis):
        lo, hi = (ci or [None, None])[:2]
        ok = _finite(v)
        plus.append(hi - v if ok and _finite(hi) else 0.0)
        minus.append(v - lo if ok and _finite(lo) else 0.0)
    return plus, minus


def _base_layout(fig, title: str, *, height: int = PNG_HEIGHT, width: int = PNG_WIDTH, legend_y: float = -0.16,
                 bottom: int = 100):
    fig.update_layout(
        title=dict(text=title, x=0.02, font=dict(size=16)),
        template="plotly_white", width=width, height=height, font=dict(size=13),
        legend=dict(orientation="h", yanchor="top", y=legend_y, xanchor="center", x=0.5),
        margin=dict(l=75, r=30, t=90, b=bottom),
    )
    return fig


# ---------------------------------------------------------------- attribution

def layer_profile(scores: dict, window=None, *, key: str = "attr_flipped", title: str | None = None):
    """Per-layer attribution with 95% bootstrap CIs, the selected window shaded and labelled.

    ``scores`` is :func:`mechmed.attribution.layer_scores`'s dict. Bars: ``key`` (default mean
    |a_L| over flipped pairs) and, for contrast, the same over stable pairs; a line: the exact
    patching effect on flipped pairs when it was run. A second panel shows the flip-prediction AUC
    of each layer's top SAE feature when SAEs were used. ``window`` is a list of layers, or a
    select-layers config (dict or object) whose ``layers`` are the selected range.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    table = scores.get("scores", {})
    if key not in table:
        from mechmed.errors import MechmedError

        raise MechmedError(f"layer_profile: no score {key!r} in the scores (has {', '.join(table) or 'none'})")
    n_layers = int(scores.get("n_layers") or len(table[key]["mean"]))
    layers = list(range(n_layers))
    auc = table.get("feature_auc")
    has_auc = auc is not None and any(_finite(v) for v in auc["mean"])
    fig = make_subplots(rows=2 if has_auc else 1, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                        row_heights=[0.7, 0.3] if has_auc else None)
    bars = [(key, PALETTE[0])]
    if key == "attr_flipped" and "attr_stable" in table:
        bars.append(("attr_stable", "#999999"))
    for name, colour in bars:
        s = table[name]
        y = [v if _finite(v) else None for v in s["mean"]]
        plus, minus = _err(s["mean"], s["ci"])
        label = SCORE_LABELS.get(name, name) + f" (n={s.get('n', '?')})"
        fig.add_trace(go.Bar(x=layers, y=y, name=label, marker_color=colour,
                             error_y=dict(type="data", symmetric=False, array=plus, arrayminus=minus,
                                          color="#333333", thickness=1.2, width=4),
                             customdata=[c or [None, None] for c in s["ci"]],
                             hovertemplate="layer %{x}<br>%{y:.3g} [%{customdata[0]:.3g}, %{customdata[1]:.3g}]"
                                           f"<extra>{label}</extra>"), row=1, col=1)
    if key.startswith("gain") and "patch_flipped" in table and all(_finite(v) for v in table["patch_flipped"]["mean"]):
        # the same difference of exact patching: the gain's ground truth (no interval: the CIs are per layer)
        e = table["patch_flipped"]["mean"]
        fig.add_trace(go.Scatter(x=layers, y=[v - (e[i - 1] if i else 0.0) for i, v in enumerate(e)], mode="lines+markers",
                                 name="exact patching, |e_L| − |e_L−1| (ground truth)",
                                 line=dict(color=PALETTE[5], width=2), marker=dict(size=8, symbol="diamond")),
                      row=1, col=1)
    elif (key != "patch_flipped" and "patch_flipped" in table
          and any(_finite(v) for v in table["patch_flipped"]["mean"])):
        s = table["patch_flipped"]
        plus, minus = _err(s["mean"], s["ci"])
        fig.add_trace(go.Scatter(x=layers, y=[v if _finite(v) else None for v in s["mean"]], mode="lines+markers",
                                 name=SCORE_LABELS["patch_flipped"] + " (ground truth)",
                                 line=dict(color=PALETTE[5], width=2), marker=dict(size=8, symbol="diamond"),
                                 error_y=dict(type="data", symmetric=False, array=plus, arrayminus=minus,
                                              color=PALETTE[5], thickness=1.2, width=4)), row=1, col=1)
    if has_auc:
        x = [i for i, v in enumerate(auc["mean"]) if _finite(v)]
        fig.add_trace(go.Scatter(x=x, y=[auc["mean"][i] for i in x], mode="lines+markers", name=SCORE_LABELS["feature_auc"],
                                 line=dict(color=PALETTE[2], width=2), marker=dict(size=8),
                                 showlegend=True), row=2, col=1)
        fig.add_hline(y=0.5, line=dict(color="#777777", dash="dot", width=1), row=2, col=1,
                      annotation_text="chance", annotation_position="bottom right", annotation_font_size=11)
        fig.update_yaxes(title_text="AUC (flipped<br>vs stable)", range=[0.3, 1.02], row=2, col=1)
    sel = window_layers(window)
    for i, (a, b) in enumerate(_runs(sel)):
        for row in range(1, (2 if has_auc else 1) + 1):
            fig.add_vrect(x0=a - 0.5, x1=b + 0.5, fillcolor=PALETTE[1], opacity=0.15, line_width=0, layer="below",
                          row=row, col=1)
        if i == 0:
            fig.add_annotation(x=(sel[0] + sel[-1]) / 2 if len(_runs(sel)) == 1 else (a + b) / 2, y=1.0,
                               xref="x", yref="y domain", yanchor="bottom", showarrow=False,
                               text=f"<b>selected layers {layer_text(sel)}</b>", font=dict(color="#8a5a00", size=12))
    n_pairs, n_flipped = scores.get("n_pairs"), scores.get("n_flipped")
    sub = f"{n_flipped} of {n_pairs} pairs flipped; " if n_pairs is not None else ""
    sub += "bars: mean over pairs with 95% bootstrap CI"
    _base_layout(fig, title or f"Where paraphrase flips are carried: attribution by layer<br><sup>{sub}</sup>",
                 height=600 if has_auc else PNG_HEIGHT, legend_y=-0.12 if has_auc else -0.16, bottom=120)
    fig.update_layout(barmode="group", bargap=0.25)
    fig.update_yaxes(title_text="|Δ margin| estimate (logits)", rangemode="tozero", row=1, col=1)
    fig.update_xaxes(tickmode="array", tickvals=layers, showgrid=False)
    fig.update_xaxes(title_text="decoder layer (resid_post)", row=2 if has_auc else 1, col=1)
    return fig


def _feature_rows(results, top: int) -> list[dict]:
    """:func:`mechmed.attribution.feature_table` rows of rank < ``top``, as given or read back from
    features.csv (strings)."""
    rows = []
    for r in results:
        row = dict(r)
        for k in ("layer", "rank", "feature"):
            row[k] = int(float(row[k]))
        for k in ("mean_delta_f", "mean_attr", "mean_abs_attr", "auc", "recovery"):
            v = row.get(k)
            row[k] = float(v) if v not in (None, "") else None
        if row["rank"] < top:
            rows.append(row)
    return rows


def feature_heatmap(results, top: int = 10, *, value: str = "mean_attr", title: str | None = None):
    """Layer × feature heatmap of the top ``top`` SAE features per layer (ranked by mean |attribution|
    over flipped pairs), coloured by the signed mean attribution a = −Δf·(∇m·W_dec) (diverging scale
    centred at 0); each cell is labelled with the feature's index (SAE features differ per layer, so
    the columns are ranks, not features). ``results`` are :func:`mechmed.attribution.feature_table`
    rows (as in ``features.csv``).
    """
    import plotly.graph_objects as go

    rows = _feature_rows(results, top)
    layers = sorted({r["layer"] for r in rows})
    k = max((r["rank"] for r in rows), default=-1) + 1
    z = [[None] * k for _ in layers]
    text = [[""] * k for _ in layers]
    hover = [[None] * k for _ in layers]
    for r in rows:
        i = layers.index(r["layer"])
        z[i][r["rank"]] = r[value]
        label = str(r.get("label") or "")
        short = label if len(label) <= 18 else label[:17] + "…"
        text[i][r["rank"]] = f"#{r['feature']}" + (f"<br>{short}" if short else "")
        hover[i][r["rank"]] = [r["feature"], r.get("mean_delta_f"), r.get("auc"), r.get("recovery"), label or "none"]
    vals = [abs(v) for row in z for v in row if _finite(v)]
    zmax = max(vals) if vals else 1.0
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"top {j + 1}" for j in range(k)], y=[f"layer {layer}" for layer in layers], text=text,
        texttemplate="%{text}", textfont=dict(size=11), customdata=hover,
        colorscale="RdBu_r", zmid=0, zmin=-zmax, zmax=zmax, xgap=2, ygap=2,
        colorbar=dict(title=dict(text="mean attribution<br>(logits)", side="right"), thickness=14),
        hovertemplate=("%{y}, %{x}: feature %{customdata[0]}<br>label: %{customdata[4]}<br>mean attribution %{z:.3g}"
                       "<br>mean Δf %{customdata[1]:.3g}<br>AUC %{customdata[2]:.2f}"
                       "<br>delta-patch recovery %{customdata[3]:.2f}<extra></extra>"),
    ))
    _base_layout(fig, title or "Top SAE features per layer by |attribution| on flipped pairs",
                 height=max(340, 140 + 46 * len(layers)), bottom=60)
    fig.update_layout(margin=dict(t=110), title_subtitle=dict(
        font=dict(size=12), text="colour: signed mean attribution −Δf·(∇margin·W_dec); cell text: the feature's "
        "index" + (" and its label (from the SAEs' explanations)" if any(r.get("label") for r in rows) else "")
        + "<br>red: setting the feature to its value on the question raises the paraphrase's yes−no margin; "
        "blue: lowers it"))
    fig.update_yaxes(autorange="reversed", title_text="SAE layer")
    fig.update_xaxes(title_text="feature rank within the layer", side="bottom")
    return fig


# ---------------------------------------------------------------- training

def _smooth(values: Sequence[float], n: int) -> list[float]:
    """Trailing moving average over ``n`` points (shorter at the start)."""
    out, acc = [], []
    for v in values:
        acc.append(v)
        if len(acc) > n:
            acc.pop(0)
        out.append(sum(acc) / len(acc))
    return out


def training_curves(history: Sequence[dict], *, collapse_low: float = 0.05, collapse_high: float = 0.95,
                    title: str | None = None, weights: dict | None = None):
    """Loss components against step (top) and the guard's held-out yes-rate (bottom) with the
    collapse bands (yes-rate ≤ ``collapse_low`` or ≥ ``collapse_high``) shaded and the first
    collapsed check marked. ``history`` is train_log.jsonl's records; ``title`` replaces the
    headline (the subtitle saying how the curves are smoothed stays). ``weights`` (``{"ce": w,
    "consistency": w}``, the training config's loss weights) marks a component with weight 0 as
    logged but not trained on."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    history = sorted(history, key=lambda h: h["step"])
    steps = [h["step"] for h in history]
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1, row_heights=[0.6, 0.4])
    window = max(1, len(history) // 20)
    # the total last and dashed, so it stays visible where it equals one component
    comps = [("ce", "cross-entropy", PALETTE[1], None), ("consistency", "consistency", PALETTE[2], None),
             ("balance", "load balance", PALETTE[3], None), ("loss", "total loss", PALETTE[0], "dash")]
    weights = weights or {}
    for k, label, colour, dash in comps:
        pts = [(h["step"], h[k]) for h in history if _finite(h.get(k))]
        if not pts:
            continue
        if weights.get(k) == 0:
            label += " (weight 0: logged, not trained on)"
        x, y = zip(*pts)
        if window > 1:
            fig.add_trace(go.Scatter(x=x, y=y, mode="lines", line=dict(color=colour, width=1), opacity=0.3,
                                     legendgroup=k, showlegend=False, hoverinfo="skip"), row=1, col=1)
        fig.add_trace(go.Scatter(x=x, y=_smooth(y, window), mode="lines", name=label, legendgroup=k,
                                 line=dict(color=colour, width=2.2, dash=dash),
                                 hovertemplate=f"step %{{x}}<br>{label} %{{y:.4f}}<extra></extra>"), row=1, col=1)
    guard = [h for h in history if _finite(h.get("guard_yes_rate"))]
    for y0, y1 in ((0, collapse_low), (collapse_high, 1)):
        fig.add_hrect(y0=y0, y1=y1, fillcolor=COLLAPSE_COLOUR, opacity=0.15, line_width=0, layer="below", row=2, col=1,
                      exclude_empty_subplots=False)
    fig.add_annotation(x=0.01, y=(collapse_high + 1) / 2, xref="x domain", yref="y2", showarrow=False, xanchor="left",
                       text=f"collapse: yes-rate ≥ {collapse_high:g}", font=dict(color=COLLAPSE_COLOUR, size=11))
    fig.add_annotation(x=0.01, y=collapse_low / 2, xref="x domain", yref="y2", showarrow=False, xanchor="left",
                       text=f"collapse: yes-rate ≤ {collapse_low:g}", font=dict(color=COLLAPSE_COLOUR, size=11))
    if guard:
        fig.add_trace(go.Scatter(x=[h["step"] for h in guard], y=[h["guard_yes_rate"] for h in guard],
                                 mode="lines+markers", name="held-out yes-rate (guard)",
                                 line=dict(color="#000000", width=2), marker=dict(size=7),
                                 hovertemplate="step %{x}<br>yes-rate %{y:.3f}<extra></extra>"), row=2, col=1)
        acc = [h for h in guard if _finite(h.get("guard_accuracy"))]
        if acc:
            fig.add_trace(go.Scatter(x=[h["step"] for h in acc], y=[h["guard_accuracy"] for h in acc],
                                     mode="lines+markers", name="held-out accuracy (guard)",
                                     line=dict(color=PALETTE[4], width=2, dash="dash"), marker=dict(size=6),
                                     hovertemplate="step %{x}<br>accuracy %{y:.3f}<extra></extra>"), row=2, col=1)
        first = next((h for h in guard if h.get("collapsed")), None)
        if first is not None:
            fig.add_trace(go.Scatter(x=[first["step"]], y=[first["guard_yes_rate"]], mode="markers",
                                     name=f"collapse detected (step {first['step']})",
                                     marker=dict(symbol="x", size=15, color=COLLAPSE_COLOUR, line=dict(width=1)),
                                     hovertext=[first.get("guard_reason") or "collapsed"],
                                     hovertemplate="step %{x}: %{hovertext}<extra></extra>"), row=2, col=1)
            fig.add_vline(x=first["step"], line=dict(color=COLLAPSE_COLOUR, dash="dot", width=1.2))
    else:
        fig.add_annotation(x=0.5, y=0.5, xref="x domain", yref="y2 domain", showarrow=False,
                           text="no guard checks in this log", font=dict(color="#777777"))
    sub = f"{len(history)} steps logged"
    if window > 1:
        sub += f"; bold lines: moving average over {window} steps, faint: per step"
    _base_layout(fig, f"{title or 'Training: loss components and the collapse guard'}<br><sup>{sub}</sup>",
                 height=620, legend_y=-0.1, bottom=120)
    fig.update_yaxes(title_text="loss (per step)", rangemode="tozero", row=1, col=1)
    fig.update_yaxes(title_text="held-out rate", range=[0, 1], tickformat=".0%", row=2, col=1)
    fig.update_xaxes(title_text="optimiser step", row=2, col=1)
    if steps:
        fig.update_xaxes(range=[min(steps) - 0.5, max(steps) + 0.5])
    return fig


# ---------------------------------------------------------------- ablation

def _arm_key(r: dict):
    arm = r["arm"]
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


def _split_base(rows: Sequence[dict], base: dict | None):
    arms = [r for r in rows if r["arm"] != "base"]
    if base is None:
        bases = [r for r in rows if r["arm"] == "base"]
        base = bases[0] if len(bases) == 1 else None
    return arms, base


def same_as_selected(arm: str, rows: Sequence[dict]) -> bool:
    """Whether baseline range ``arm`` trains exactly the selected range's layers (then it repeats
    the selected arm: e.g. ``late`` when the selection is the last layers)."""
    if arm in ("selected", "base", "ce_only", "consistency_only"):
        return False

    def layers(name):
        return next((list(r.get("layers") or []) for r in rows if r["arm"] == name), None)

    sel = layers("selected")
    return bool(sel) and layers(arm) == sel


def _arm_tick(arm: str, rows: Sequence[dict]) -> str:
    layers = next((r.get("layers") for r in rows if r["arm"] == arm and r.get("layers")), None)
    label = ARM_LABELS.get(arm, arm)
    if not layers:
        return label
    # only a layer range can coincide with the selection by chance; the other arms use it by design
    same = " = selected" if arm in RANGE_ARMS and same_as_selected(arm, rows) else ""
    return f"{label}<br><span style='font-size:11px'>L{layer_text(layers)}{same}</span>"


def _grouped(arms: Sequence[dict]):
    """(arm order, method order, {(arm, method): [rows]})."""
    groups: dict = {}
    for r in sorted(arms, key=_arm_key):
        groups.setdefault((r["arm"], r["method"]), []).append(r)
    arm_names = list(dict.fromkeys(a for a, _ in groups))
    methods = list(dict.fromkeys(m for _, m in groups))
    return arm_names, methods, groups


def flip_by_arm(rows: Sequence[dict], base: dict | None = None, *, title: str | None = None):
    """Held-out flip rate (left) and mean |Δmargin| (right) per ablation arm, bars grouped by adapter
    method with 95% CIs, the base model as a dashed reference line, collapsed arms hatched.

    ``rows`` are ablation rows (``results.json``'s ``summary`` for one bar per arm and method; with
    per-seed rows the bar is the mean over seeds and each seed is a dot). ``base`` defaults to the
    ``arm == "base"`` row among ``rows``.
    """
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    arms, base = _split_base(rows, base)
    arm_names, methods, groups = _grouped(arms)
    ticks = [_arm_tick(a, arms) for a in arm_names]
    fig = make_subplots(rows=1, cols=2, horizontal_spacing=0.1,
                        subplot_titles=("flip rate (share of pairs whose answer flips)", "mean |Δmargin| (logits)"))
    panels = (("flip_rate", "flip_ci", 1), ("margin_diff", "margin_diff_ci", 2))
    for mi, method in enumerate(methods):
        colour = PALETTE[mi % len(PALETTE)]
        for key, ci_key, col in panels:
            xs, ys, plus, minus, collapsed, n_seeds = [], [], [], [], [], []
            for arm in arm_names:
                g = groups.get((arm, method))
                if not g:
                    continue
                y = sum(r[key] for r in g) / len(g)
                ci = g[0].get(ci_key) if len(g) == 1 else None
                p, m = _err([y], [ci])
                xs.append(ticks[arm_names.index(arm)])
                ys.append(y)
                plus += p
                minus += m
                collapsed.append(any(r.get("collapsed") for r in g))
                n_seeds.append(g[0].get("n_seeds") or len(g))
            fig.add_trace(go.Bar(
                x=xs, y=ys, name=METHOD_LABELS.get(method, method), legendgroup=method, showlegend=col == 1,
                marker=dict(color=colour, pattern=dict(shape=["/" if c else "" for c in collapsed],
                                                       fgcolor=COLLAPSE_COLOUR, solidity=0.3)),
                error_y=dict(type="data", symmetric=False, array=plus, arrayminus=minus, color="#333333",
                             thickness=1.2, width=4),
                customdata=list(zip(n_seeds, collapsed)),
                hovertemplate="%{x}<br>%{y:.3f} (seeds: %{customdata[0]}, collapsed: %{customdata[1]})"
                              f"<extra>{METHOD_LABELS.get(method, method)}</extra>"), row=1, col=col)
            for arm in arm_names:
                g = groups.get((arm, method)) or []
                if len(g) > 1:
                    fig.add_trace(go.Scatter(x=[ticks[arm_names.index(arm)]] * len(g), y=[r[key] for r in g],
                                             mode="markers", marker=dict(color="#000000", size=5), showlegend=False,
                                             legendgroup=method, offsetgroup=method, hoverinfo="y"), row=1, col=col)
    if base is not None:
        for key, ci_key, col in panels:
            v, ci = base[key], base.get(ci_key) or [None, None]
            if _finite(ci[0]) and _finite(ci[1]):
                fig.add_hrect(y0=ci[0], y1=ci[1], fillcolor="#555555", opacity=0.1, line_width=0, row=1, col=col)
            fig.add_hline(y=v, line=dict(color="#333333", dash="dash", width=1.5), row=1, col=col)
        fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", line=dict(color="#333333", dash="dash", width=1.5),
                                 name=f"base model (flip rate {base['flip_rate']:.3f}, |Δmargin| "
                                      f"{base['margin_diff']:.2f}); band: 95% CI"))
    if any(r.get("collapsed") for r in arms):
        fig.add_trace(go.Bar(x=[None], y=[None], name="collapsed (guard)",
                             marker=dict(color="white", line=dict(color=COLLAPSE_COLOUR, width=1),
                                         pattern=dict(shape="/", fgcolor=COLLAPSE_COLOUR))))
    _base_layout(fig, title or ("Layer-range ablation: consistency after training<br><sup>lower is better; "
                                "bars: 95% CI; dashed line and grey band: base model</sup>"),
                 width=1000, height=520 if len(arm_names) <= 6 else 600,
                 legend_y=-0.17 if len(arm_names) <= 6 else -0.36, bottom=110 if len(arm_names) <= 6 else 190)
    fig.update_layout(barmode="group", bargap=0.3)
    fig.update_yaxes(rangemode="tozero")
    fig.update_yaxes(title_text="flip rate", tickformat=".0%", row=1, col=1)
    fig.update_yaxes(title_text="|margin(q) − margin(p)| (logits)", row=1, col=2)
    # more than six arms do not fit side by side in half the figure's width
    fig.update_xaxes(tickangle=0 if len(arm_names) <= 6 else -35, tickfont=dict(size=11))
    fig.update_annotations(font_size=13, selector=dict(xref="x domain"))
    return fig


def trained_methods(rows: Sequence[dict]) -> list[str]:
    """The adapter methods among ablation rows (the base and the training-free arms, method ``none``, aside)."""
    return list(dict.fromkeys(r["method"] for r in rows if r["method"] != "none"))


def arm_label(r: dict, rows: Sequence[dict]) -> str:
    """An arm's label, with its method when ``rows`` hold more than one adapter method."""
    label = ARM_LABELS.get(r["arm"], r["arm"])
    if len(trained_methods(rows)) > 1 and r["method"] != "none":
        label += f" ({METHOD_LABELS.get(r['method'], r['method'])})"
    return label


QUADRANT_LABELS = {"consistent_reliant": "consistent, image-reliant", "consistent_blind": "consistent, not image-reliant",
                   "flipped_reliant": "flipped, image-reliant", "flipped_blind": "flipped, not image-reliant"}
QUADRANT_COLOURS = {"consistent_reliant": "#009E73", "consistent_blind": "#F0E442", "flipped_reliant": "#56B4E9",
                    "flipped_blind": "#D55E00"}


def quadrant_bars(rows: Sequence[dict], *, title: str | None = None):
    """Per arm (summary rows with ``quadrants``; the base first), the held-out pairs split into
    consistency × image reliance as stacked horizontal bars that sum to 1, each segment's share
    written on it and its 95% Wilson interval in the hover."""
    import plotly.graph_objects as go

    from mechmed.consistency import QUADRANTS, RELIANCE_WORDS, quadrant_definition

    rows = sorted([r for r in rows if r.get("quadrants")], key=_arm_key)
    words = RELIANCE_WORDS[quadrant_definition(rows[0]["quadrants"])] if rows else ""
    labels = [arm_label(r, rows) for r in rows]
    fig = go.Figure()
    for name in QUADRANTS:
        cells = [r["quadrants"][name] for r in rows]
        fig.add_trace(go.Bar(
            y=labels, x=[c["share"] for c in cells], orientation="h", name=QUADRANT_LABELS[name],
            marker=dict(color=QUADRANT_COLOURS[name], line=dict(color="white", width=1)),
            text=[f"{c['share']:.2f}" if c["share"] >= 0.04 else "" for c in cells], textposition="inside",
            insidetextanchor="middle", customdata=[[c["n"], *c["ci"]] for c in cells],
            hovertemplate="%{y}: %{x:.3f} (%{customdata[0]} pairs; 95% CI %{customdata[1]:.3f}–%{customdata[2]:.3f})"
                          f"<extra>{QUADRANT_LABELS[name]}</extra>"))
    _base_layout(fig, title or ("Consistency × image reliance of the held-out pairs<br><sup>image-reliant: "
                                + words.replace(
                                    " (the same", "<br>(the same") + "</sup>"),
                 width=900, height=140 + 34 * len(rows), legend_y=-0.12, bottom=90)
    fig.update_layout(barmode="stack", legend_traceorder="normal")
    fig.update_xaxes(range=[0, 1], tickformat=".0%", title_text="share of pairs")
    fig.update_yaxes(autorange="reversed")
    return fig


PHENOMENON_LABELS = {"syntactic_restructuring": "syntactic", "lexical_substitution": "lexical",
                     "negation_pattern": "negation", "formality": "formality", "scope": "scope",
                     "specificity": "specificity"}
SET_LABELS = {"unseen": "unseen wrappers", "negation": "negation set"}


def flip_heatmap(rows: Sequence[dict], *, title: str | None = None):
    """Flip rate of the base model and of every arm (rows of the map), by phenomenon of the main
    evaluation set and for each extra evaluation set (columns), the value written in each cell.

    ``rows`` are ablation rows with ``by_phenomenon`` (phenomenon -> flip rate) and ``sets`` (name ->
    {flip_rate, ...}), as ``results.json``'s ``summary`` holds them.
    """
    import plotly.graph_objects as go

    rows = sorted(rows, key=_arm_key)
    phenomena = list(dict.fromkeys(k for r in rows for k in (r.get("by_phenomenon") or {})))
    sets = list(dict.fromkeys(k for r in rows for k in (r.get("sets") or {})))
    cols = ["all (main set)"] + [PHENOMENON_LABELS.get(k, k) for k in phenomena] + [SET_LABELS.get(k, k) for k in sets]
    z, labels = [], []
    for r in rows:
        label = arm_label(r, rows)
        if r.get("layers"):
            label += f" · L{layer_text(r['layers'])}"
        if r.get("collapsed"):
            label += " (collapsed)"
        labels.append(label)
        z.append([r.get("flip_rate")] + [(r.get("by_phenomenon") or {}).get(k) for k in phenomena]
                 + [((r.get("sets") or {}).get(k) or {}).get("flip_rate") for k in sets])
    text = [["" if v is None else f"{v:.2f}" for v in line] for line in z]
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=labels, text=text, texttemplate="%{text}", textfont=dict(size=12),
        colorscale="YlOrRd", zmin=0, zmax=max([v for line in z for v in line if v is not None] + [0.01]),
        colorbar=dict(title=dict(text="flip rate", side="right"), tickformat=".0%"), xgap=2, ygap=2,
        hovertemplate="%{y}<br>%{x}: %{z:.3f}<extra></extra>"))
    if sets:
        fig.add_vline(x=len(cols) - len(sets) - 0.5, line=dict(color="#333333", width=2))
    _base_layout(fig, title or ("Flip rate by phenomenon and evaluation set<br><sup>rows: base model and each "
                                "trained arm; left of the line: the main evaluation set, right: the sets reported "
                                "beside it; lighter is better</sup>"),
                 width=max(760, 110 * len(cols) + 260), height=max(360, 44 * len(rows) + 190), bottom=60)
    fig.update_yaxes(autorange="reversed")
    fig.update_xaxes(side="top", tickangle=0)
    return fig


def _place_labels(points, x_range, y_range, plot_w: float, plot_h: float, font_px: float = 12.0):
    """Greedy label placement: for each (x, y, text) pick the pixel offset (ax, ay) among a few
    candidates whose label box overlaps the fewest markers and labels already placed."""
    def px(x, y):
        return ((x - x_range[0]) / (x_range[1] - x_range[0]) * plot_w,
                (y_range[1] - y) / (y_range[1] - y_range[0]) * plot_h)

    marks = [px(x, y) for x, y, _ in points]
    boxes: list[tuple[float, float, float, float]] = []
    candidates = [(dx * r, dy * r) for r in (1, 1.8, 2.6)
                  for dx, dy in ((30, -22), (30, 22), (-30, -22), (-30, 22), (0, -30), (0, 30), (45, 0), (-45, 0))]
    out = []
    for (_, _, text), (mx, my) in zip(points, marks):
        w, h = 0.6 * font_px * len(text) + 6, font_px + 6
        best, best_cost = candidates[0], None
        for ax, ay in candidates:
            cx, cy = mx + ax, my + ay
            # box anchored on the side away from the point
            x0 = cx if ax > 0 else cx - w if ax < 0 else cx - w / 2
            box = (x0, cy - h / 2, x0 + w, cy + h / 2)
            cost = sum(1 for bx in boxes if not (box[2] < bx[0] or bx[2] < box[0] or box[3] < bx[1] or bx[3] < box[1]))
            cost += sum(1 for qx, qy in marks if box[0] - 6 <= qx <= box[2] + 6 and box[1] - 6 <= qy <= box[3] + 6)
            cost += 2 * (box[0] < 0 or box[2] > plot_w or box[1] < 0 or box[3] > plot_h)
            cost += (abs(ax) + abs(ay)) / 1000  # prefer near
            if best_cost is None or cost < best_cost:
                best, best_cost = (ax, ay), cost
                best_box = box
        boxes.append(best_box)
        out.append(best)
    return out


def tradeoff(rows: Sequence[dict], base: dict | None = None, *, title: str | None = None):
    """Canonical accuracy against held-out flip rate, one point per arm and method (95% CIs on both
    axes), the base model as a star; the better corner (few flips, high accuracy) is marked."""
    import plotly.graph_objects as go

    arms, base = _split_base(rows, base)
    arm_names, methods, groups = _grouped(arms)
    fig = go.Figure()
    symbols = ("circle", "square", "diamond", "triangle-up", "cross")
    labels = []  # (x, y, text, colour)
    for mi, method in enumerate(methods):
        colour = PALETTE[mi % len(PALETTE)]
        pts = []
        for arm in arm_names:
            g = groups.get((arm, method))
            if not g:
                continue
            x = sum(r["flip_rate"] for r in g) / len(g)
            y = sum(r["canonical_accuracy"] for r in g) / len(g)
            one = g[0] if len(g) == 1 else {}
            pts.append((arm, x, y, one.get("flip_ci"), one.get("accuracy_ci"), any(r.get("collapsed") for r in g)))
        if not pts:
            continue
        xp, xm = _err([p[1] for p in pts], [p[3] for p in pts])
        yp, ym = _err([p[2] for p in pts], [p[4] for p in pts])
        text = [ARM_LABELS.get(p[0], p[0]) + (" (collapsed)" if p[5] else "") for p in pts]
        suffix = (f" ({METHOD_LABELS.get(method, method)})" if len(trained_methods(arms)) > 1 and method != "none"
                  else "")
        labels += [(p[1], p[2], t + suffix, colour) for p, t in zip(pts, text)]
        fig.add_trace(go.Scatter(
            x=[p[1] for p in pts], y=[p[2] for p in pts], mode="markers", name=METHOD_LABELS.get(method, method),
            text=text, marker=dict(color=colour, size=11, symbol=symbols[mi % len(symbols)],
                                   line=dict(color=[COLLAPSE_COLOUR if p[5] else "white" for p in pts], width=2)),
            error_x=dict(type="data", symmetric=False, array=xp, arrayminus=xm, color=colour, thickness=1.2, width=3),
            error_y=dict(type="data", symmetric=False, array=yp, arrayminus=ym, color=colour, thickness=1.2, width=3),
            hovertemplate="%{text}<br>flip rate %{x:.3f}<br>accuracy %{y:.3f}<extra></extra>"))
    if base is not None:
        xp, xm = _err([base["flip_rate"]], [base.get("flip_ci")])
        yp, ym = _err([base["canonical_accuracy"]], [base.get("accuracy_ci")])
        labels.append((base["flip_rate"], base["canonical_accuracy"], "base", "#000000"))
        fig.add_trace(go.Scatter(
            x=[base["flip_rate"]], y=[base["canonical_accuracy"]], mode="markers", name="base model",
            marker=dict(color="#000000", size=16, symbol="star"),
            error_x=dict(type="data", symmetric=False, array=xp, arrayminus=xm, color="#000000", thickness=1.2),
            error_y=dict(type="data", symmetric=False, array=yp, arrayminus=ym, color="#000000", thickness=1.2),
            hovertemplate="base<br>flip rate %{x:.3f}<br>accuracy %{y:.3f}<extra></extra>"))
    merged: dict = {}  # arms with identical results (e.g. the same layers trained twice) share one label
    for x, y, t, colour in labels:
        merged.setdefault((round(x, 9), round(y, 9), colour), [x, y, [], colour])[2].append(t)
    labels = [(x, y, " = ".join(ts), colour) for x, y, ts, colour in merged.values()]
    fig.add_annotation(x=0.01, y=0.99, xref="paper", yref="paper", xanchor="left", yanchor="top", showarrow=False,
                       text="← better: fewer flips,<br>higher accuracy ↑", align="left",
                       font=dict(size=12, color="#2b6e2b"), bgcolor="rgba(255,255,255,0.8)")
    height, width = 560, PNG_WIDTH
    _base_layout(fig, title or ("Consistency against accuracy per ablation arm<br><sup>held-out pairs; bars: 95% CI; "
                                "upper left is better</sup>"), height=height, bottom=100)
    if labels:
        xs, ys = [v[0] for v in labels], [v[1] for v in labels]
        pad_x = max(0.02, 0.2 * (max(xs) - min(xs)))
        pad_y = max(0.02, 0.2 * (max(ys) - min(ys)))
        x_range = [max(-0.01, min(xs) - pad_x), max(xs) + pad_x]
        y_range = [max(0.0, min(ys) - pad_y), min(1.02, max(ys) + pad_y)]
        fig.update_xaxes(range=x_range)
        fig.update_yaxes(range=y_range)
        m = fig.layout.margin
        offsets = _place_labels([(x, y, t) for x, y, t, _ in labels], x_range, y_range,
                                width - m.l - m.r, height - m.t - m.b)
        for (x, y, t, colour), (ax, ay) in zip(labels, offsets):
            fig.add_annotation(x=x, y=y, text=t, ax=ax, ay=ay, showarrow=True, arrowhead=0, arrowwidth=1,
                               arrowcolor="#888888", font=dict(size=12, color=colour),
                               xanchor="left" if ax > 0 else "right" if ax < 0 else "center",
                               bgcolor="rgba(255,255,255,0.75)")
    fig.update_xaxes(title_text="held-out flip rate (lower is better)", tickformat=".0%")
    fig.update_yaxes(title_text="canonical accuracy (higher is better)", tickformat=".0%")
    return fig


def expert_heatmap(stats: dict, *, title: str | None = None):
    """Heatmap of the fraction of tokens routed to each expert, decoder layer × expert.

    ``stats`` is :func:`mechmed.spectral.expert_utilisation`'s result (its ``layers`` rows: per layer,
    the mean over the layer's adapted modules of each expert's share of the top-k assignments).
    Uniform use is 1/N per expert, the colour scale's midpoint.
    """
    import plotly.graph_objects as go

    rows = stats.get("layers") or {}
    layers = sorted(rows, key=lambda k: int(k))
    n = int(stats.get("n_experts") or (len(rows[layers[0]]) if layers else 0))
    z = [list(rows[k]) for k in layers]
    uniform = 1.0 / n if n else 0.0
    top = max([uniform * 2] + [v for row in z for v in row if _finite(v)])
    fig = go.Figure(go.Heatmap(
        z=z, x=[f"expert {i}" for i in range(n)], y=[f"layer {int(k)}" for k in layers],
        colorscale="RdBu_r", zmin=0.0, zmax=top, zmid=uniform,
        colorbar=dict(title="share of<br>tokens", tickformat=".2f"),
        text=[[f"{v:.3f}" for v in row] for row in z], texttemplate="%{text}" if n <= 16 else None,
        hovertemplate="%{y}, %{x}<br>share %{z:.3f}<extra></extra>",
    ))
    k = stats.get("top_k")
    sub = f"top-{k} of {n} experts" if k else f"{n} experts"
    fig.update_layout(
        title=dict(text=title or (f"Expert utilisation by layer<br><sup>{sub}; share of top-k assignments over "
                                  f"{stats.get('tokens', '?')} tokens; uniform = {uniform:.3f}</sup>"),
                   x=0.02, font=dict(size=16)),
        template="plotly_white", width=PNG_WIDTH, height=max(300, 120 + 45 * len(layers)),
        margin=dict(l=90, r=30, t=80, b=60), font=dict(size=13),
    )
    fig.update_yaxes(autorange="reversed")
    return fig


# ---------------------------------------------------------------- the selection audit

AUDIT_KIND_LABELS = {"window": "contiguous window", "random": "random layer set",
                     "all_matched": "all layers, matched parameters", "all": "all layers, same rank"}


def audit_scatter(audit: dict, *, title: str | None = None):
    """The selection audit (:func:`mechmed.selection_audit.analyse`): per unit (seed), each same-size layer
    set's predicted score (Σ of the selection's score over its layers) against the flip-rate reduction its
    training achieved (95% CI by question); the selected window is a star, all-layer candidates dashed
    lines. A selection score that predicts training puts the points on a rising line with the star on top."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    units = audit["units"]
    key = audit["pooled"].get("select_key", "gain_flipped")
    cols = min(len(units), 5)
    fig = make_subplots(rows=1, cols=cols, shared_yaxes=True, horizontal_spacing=0.03,
                        subplot_titles=[u["label"] for u in units[:cols]])
    styles = {"window": ("circle", PALETTE[0]), "random": ("diamond-open", PALETTE[1])}
    for ci, u in enumerate(units[:cols], start=1):
        for kind, (symbol, colour) in styles.items():
            rows = [r for r in u["candidates"] if r["kind"] == kind and r.get("predicted") is not None]
            if not rows:
                continue
            yp, ym = _err([r["flip_reduction"] for r in rows], [r["flip_reduction_ci"] for r in rows])
            fig.add_trace(go.Scatter(
                x=[r["predicted"] for r in rows], y=[r["flip_reduction"] for r in rows], mode="markers",
                name=AUDIT_KIND_LABELS[kind], legendgroup=kind, showlegend=ci == 1,
                text=[f"layers {layer_text(r['layers'])}" for r in rows],
                marker=dict(symbol=symbol, size=10, color=colour, line=dict(width=1.5, color=colour)),
                error_y=dict(type="data", symmetric=False, array=yp, arrayminus=ym, color=colour, thickness=1, width=2),
                hovertemplate="%{text}<br>predicted %{x:.2f}<br>flip reduction %{y:.3f}<extra></extra>"), row=1, col=ci)
        sel = [r for r in u["candidates"] if r.get("selected") and r.get("predicted") is not None]
        if sel:
            fig.add_trace(go.Scatter(
                x=[sel[0]["predicted"]], y=[sel[0]["flip_reduction"]], mode="markers", name="selected window",
                legendgroup="selected", showlegend=ci == 1, text=[f"layers {layer_text(sel[0]['layers'])}"],
                marker=dict(symbol="star", size=18, color=PALETTE[5], line=dict(width=1, color="#000000")),
                hovertemplate="selected: %{text}<br>predicted %{x:.2f}<br>flip reduction %{y:.3f}<extra></extra>"),
                row=1, col=ci)
        for kind, dash, colour in (("all_matched", "dash", PALETTE[2]), ("all", "dot", PALETTE[3])):
            r = next((r for r in u["candidates"] if r["kind"] == kind), None)
            if r is None:
                continue
            fig.add_hline(y=r["flip_reduction"], line=dict(dash=dash, color=colour, width=1.5), row=1, col=ci)
            if ci == 1:
                fig.add_trace(go.Scatter(x=[None], y=[None], mode="lines", name=AUDIT_KIND_LABELS[kind],
                                         line=dict(dash=dash, color=colour)), row=1, col=1)
    width = max(PNG_WIDTH, 300 * cols)
    _base_layout(fig, title or ("Does the selection predict where training helps?<br><sup>each point a layer set "
                                "trained alike; up is better; a useful score puts the star at the top</sup>"),
                 height=520, width=width, legend_y=-0.2, bottom=120)
    xlabel = f"predicted: Σ over the set's layers of the {SCORE_LABELS.get(key, key)}"
    if cols == 1:
        fig.update_xaxes(title_text=xlabel)
    else:  # one label under all panels
        fig.add_annotation(x=0.5, y=-0.13, xref="paper", yref="paper", showarrow=False, text=xlabel,
                           font=dict(size=14))
    fig.update_layout(legend=dict(y=-0.22 if cols > 1 else -0.2))
    fig.update_yaxes(title_text="flips removed (base − trained flip rate)", tickformat=".0%", row=1, col=1)
    return fig
