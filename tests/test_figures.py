"""Figures from realistic inputs: the drawn data must be the input's numbers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from mechmed import figures as F
from mechmed.attribution import PairAttribution, feature_table, layer_scores

N_LAYERS, N_FEATURES = 6, 40


def make_results(n: int = 24, seed: int = 0) -> list[PairAttribution]:
    """Per-pair attributions shaped like attribute_batch's (flips carried by layers 2-4)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        flipped = i % 3 == 0
        m_q = float(rng.normal(2, 1))
        m_p = -abs(float(rng.normal(1, 0.5))) if flipped and m_q > 0 else float(rng.normal(2, 1))
        scale = np.array([0.1, 0.5, 3, 4, 3.5, 1.0]) * (2 if flipped else 0.5)
        attr = rng.normal(scale, 0.3 * scale)
        feats = {}
        for layer in (1, 2, 3):
            f_q = np.maximum(rng.normal(0, 1, N_FEATURES), 0)
            f_p = np.maximum(f_q + rng.normal(0, 0.5, N_FEATURES) + (1.5 if flipped else 0) * (np.arange(N_FEATURES) == 7), 0)
            feats[layer] = {"f_q": f_q, "f_p": f_p, "attr": -(f_p - f_q) * rng.normal(0, 1, N_FEATURES)}
        out.append(PairAttribution(f"p{i}", m_q, m_p, (m_q > 0) != (m_p > 0), attr, np.abs(attr),
                                   patch_effect=attr * 1.1, features=feats))
    return out


@pytest.fixture(scope="module")
def results():
    return make_results()


@pytest.fixture(scope="module")
def scores(results):
    return layer_scores(results, n_bootstrap=200)


def ablation_row(arm, method, flip, seed=None, *, layers=(2, 3, 4), collapsed=False, n_seeds=1):
    return {"arm": arm, "method": method, "seed": seed, "n_seeds": n_seeds, "layers": list(layers),
            "trainable_parameters": 0 if arm == "base" else 24576 * len(layers) // 3,
            "flip_rate": flip, "flip_ci": [flip - 0.02, flip + 0.025],
            "margin_diff": 10 * flip, "margin_diff_ci": [10 * flip - 0.1, 10 * flip + 0.15],
            "canonical_accuracy": 0.9 - flip / 4, "accuracy_ci": [0.88 - flip / 4, 0.915 - flip / 4],
            "yes_rate": 0.97 if collapsed else 0.5, "collapsed": collapsed,
            "p_vs_base": None if arm == "base" else 0.01, "p_vs_ce_only": None if arm in ("base", "ce_only") else 0.2,
            "n_pairs": 1000, "run_dir": None}


def ablation_summary():
    rows = [ablation_row("base", "none", 0.29, layers=())]
    for method, shift in (("lora", 0.0), ("spectral_moe", 0.01)):
        rows += [ablation_row("selected", method, 0.19 + shift), ablation_row("early", method, 0.22 + shift, layers=(0, 1, 2)),
                 ablation_row("late", method, 0.25 + shift, layers=(3, 4, 5)),
                 ablation_row("ce_only", method, 0.27 + shift),
                 ablation_row("consistency_only", method, 0.05 + shift, collapsed=True)]
    return rows


def _bars_from(trace):
    return np.asarray(trace.y, dtype=float), np.asarray(trace.error_y.array), np.asarray(trace.error_y.arrayminus)


def test_layer_profile_error_bars_and_window(scores):
    fig = F.layer_profile(scores, window=[2, 3, 4])
    bar = fig.data[0]
    s = scores["scores"]["attr_flipped"]
    y, plus, minus = _bars_from(bar)
    assert list(bar.x) == list(range(N_LAYERS))
    np.testing.assert_allclose(y, s["mean"])
    np.testing.assert_allclose(y + plus, [c[1] for c in s["ci"]])
    np.testing.assert_allclose(y - minus, [c[0] for c in s["ci"]])
    assert "stable" in fig.data[1].name and "patch" in fig.data[2].name
    rects = [sh for sh in fig.layout.shapes if sh.type == "rect"]
    assert rects and all((sh.x0, sh.x1) == (1.5, 4.5) for sh in rects)
    assert any("selected layers 2–4" in a.text for a in fig.layout.annotations)
    # the feature-AUC panel, when SAE features were attributed
    assert any(t.name and "AUC" in t.name for t in fig.data)


def test_layer_profile_of_the_gain_draws_the_gain_of_exact_patching(scores):
    fig = F.layer_profile(scores, window=[1, 2], key="gain_flipped")
    np.testing.assert_allclose(np.asarray(fig.data[0].y, float), scores["scores"]["gain_flipped"]["mean"])
    exact = next(t for t in fig.data if "exact patching" in (t.name or ""))
    e = np.asarray(scores["scores"]["patch_flipped"]["mean"], float)
    np.testing.assert_allclose(np.asarray(exact.y, float), np.diff(e, prepend=0.0))


def test_layer_profile_window_forms(scores):
    gaps = F.layer_profile(scores, window={"layers": [1, 3, 4], "method": "lora"})
    spans = sorted({(sh.x0, sh.x1) for sh in gaps.layout.shapes if sh.type == "rect"})
    assert spans == [(0.5, 1.5), (2.5, 4.5)]
    assert not [sh for sh in F.layer_profile(scores).layout.shapes if sh.type == "rect"]


def test_feature_heatmap_z_is_the_feature_table(results):
    top = 5
    rows = feature_table(results, top=top)
    fig = F.feature_heatmap(rows, top=top)
    hm = fig.data[0]
    layers = sorted({r["layer"] for r in rows})
    expected = np.zeros((len(layers), top))
    for r in rows:
        expected[layers.index(r["layer"]), r["rank"]] = r["mean_attr"]
    np.testing.assert_allclose(np.asarray(hm.z, dtype=float), expected)
    assert hm.zmid == 0 and hm.zmin == -hm.zmax
    assert list(hm.y) == [f"layer {layer}" for layer in layers]
    assert hm.text[0][0] == f"#{rows[0]['feature']}"
    # rows read back from features.csv (strings) draw the same matrix
    as_csv = [{k: ("" if v is None else str(v)) for k, v in r.items()} for r in rows]
    np.testing.assert_allclose(np.asarray(F.feature_heatmap(as_csv, top=top).data[0].z, dtype=float), expected)


def test_training_curves_marks_collapse():
    history = []
    for step in range(1, 61):
        rec = {"step": step, "epoch": 0, "loss": 1 / step, "ce": 0.6 / step, "consistency": 0.4 / step}
        if step % 20 == 0:
            yes = {20: 0.5, 40: 0.97, 60: 0.99}[step]
            rec.update(guard_yes_rate=yes, guard_accuracy=0.7, guard_reason="", collapsed=yes > 0.95)
        history.append(rec)
    fig = F.training_curves(history)
    names = [t.name for t in fig.data]
    assert {"total loss", "cross-entropy", "consistency"} <= set(names)
    guard = next(t for t in fig.data if t.name == "held-out yes-rate (guard)")
    assert list(guard.x) == [20, 40, 60] and list(guard.y) == [0.5, 0.97, 0.99]
    marker = next(t for t in fig.data if t.name and t.name.startswith("collapse detected"))
    assert list(marker.x) == [40] and list(marker.y) == [0.97]
    bands = sorted((sh.y0, sh.y1) for sh in fig.layout.shapes if sh.type == "rect")
    assert bands == [(0, 0.05), (0.95, 1)]
    assert all(sh.yref == "y2" for sh in fig.layout.shapes if sh.type == "rect")
    # no guard records, no collapse: still a figure
    assert F.training_curves(history[:5]).data


def test_flip_by_arm_bars_ci_and_base():
    rows = ablation_summary()
    fig = F.flip_by_arm(rows)
    for method, colour in (("lora", F.PALETTE[0]), ("spectral_moe", F.PALETTE[1])):
        bars = [t for t in fig.data if t.type == "bar" and t.legendgroup == method]
        assert len(bars) == 2  # flip rate, |Δmargin|
        want = [r for r in rows if r["method"] == method]
        flip, margin = bars
        y, plus, minus = _bars_from(flip)
        np.testing.assert_allclose(y, [r["flip_rate"] for r in want])
        np.testing.assert_allclose(y + plus, [r["flip_ci"][1] for r in want])
        np.testing.assert_allclose(y - minus, [r["flip_ci"][0] for r in want])
        y, plus, _ = _bars_from(margin)
        np.testing.assert_allclose(y + plus, [r["margin_diff_ci"][1] for r in want])
        assert flip.marker.color == colour
        assert list(flip.marker.pattern.shape) == ["/" if r["collapsed"] else "" for r in want]
    assert "base" not in " ".join(str(x) for t in fig.data if t.type == "bar" for x in (t.x or []))
    lines = sorted(sh.y0 for sh in fig.layout.shapes if sh.type == "line")
    assert lines == pytest.approx(sorted([0.29, 2.9]))


def test_flip_by_arm_per_seed_rows():
    rows = [ablation_row("base", "none", 0.3, 0, layers=())] + [
        ablation_row("selected", "lora", f, s) for s, f in enumerate((0.18, 0.2, 0.22))]
    fig = F.flip_by_arm(rows)
    bar = next(t for t in fig.data if t.type == "bar" and t.legendgroup == "lora")
    assert bar.y[0] == pytest.approx(0.2)
    dots = [t for t in fig.data if t.type == "scatter" and t.mode == "markers"]
    assert sorted(dots[0].y) == [0.18, 0.2, 0.22]


def test_tradeoff_both_cis_and_better_corner():
    rows = ablation_summary()
    fig = F.tradeoff(rows)
    lora = next(t for t in fig.data if t.name == "LoRA")
    want = [r for r in rows if r["method"] == "lora"]
    x, y = np.asarray(lora.x), np.asarray(lora.y)
    np.testing.assert_allclose(x + np.asarray(lora.error_x.array), [r["flip_ci"][1] for r in want])
    np.testing.assert_allclose(x - np.asarray(lora.error_x.arrayminus), [r["flip_ci"][0] for r in want])
    np.testing.assert_allclose(y + np.asarray(lora.error_y.array), [r["accuracy_ci"][1] for r in want])
    np.testing.assert_allclose(y - np.asarray(lora.error_y.arrayminus), [r["accuracy_ci"][0] for r in want])
    base = next(t for t in fig.data if t.name == "base model")
    assert (base.x[0], base.y[0]) == (0.29, rows[0]["canonical_accuracy"])
    texts = [a.text for a in fig.layout.annotations]
    assert any("better" in t for t in texts)
    assert "consistency only (collapsed) (LoRA)" in texts


def test_save_figure_png(tmp_path, scores):
    if F.browser_path() is None:
        pytest.skip("no Chrome/Chromium for kaleido")
    res = F.save_figure(F.layer_profile(scores, window=[2, 3, 4]), tmp_path / "profile")
    assert res["png"] and (tmp_path / "profile.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    shared = F.save_figure(F.tradeoff(ablation_summary()), tmp_path / "figs" / "t", png=False, shared_js=True)
    assert (tmp_path / "figs" / "plotly.min.js").is_file()
    assert 'src="plotly.min.js"' in Path(shared["html"]).read_text(encoding="utf-8")


def test_a_run_directory_shares_one_plotly_js(tmp_path):
    """Inside shared_plotly(root) every figure under root loads root/plotly.min.js by a relative path
    (one copy for the whole run); outside it, or outside root, the figure inlines plotly.js."""
    import re

    import plotly.graph_objects as go

    fig = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    root = tmp_path / "run"
    with F.shared_plotly(root):
        F.save_figure(fig, root / "sae_check" / "r2", png=False)
        F.save_figure(fig, root / "ablation" / "arms" / "a" / "curves", png=False)
        F.save_figure(fig, root / "figures" / "flip", png=False, shared_js=True)
        F.save_figure(fig, tmp_path / "elsewhere" / "x", png=False)
    F.save_figure(fig, root / "after" / "y", png=False)
    srcs = {p.relative_to(root).as_posix(): re.findall(r'<script[^>]*src="([^"]+plotly\.min\.js)"', p.read_text())
            for p in root.rglob("*.html")}
    assert srcs == {"sae_check/r2.html": ["../plotly.min.js"], "ablation/arms/a/curves.html": ["../../../plotly.min.js"],
                    "figures/flip.html": ["../plotly.min.js"], "after/y.html": []}
    assert [p.relative_to(root).as_posix() for p in root.rglob("plotly.min.js")] == ["plotly.min.js"]
    assert (root / "sae_check" / "r2.html").stat().st_size < 100_000
    assert (root / "after" / "y.html").stat().st_size > 1_000_000  # inlined outside the block
    assert (tmp_path / "elsewhere" / "x.html").stat().st_size > 1_000_000  # outside the root
