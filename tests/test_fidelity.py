"""Fidelity metrics (R² about the set mean, per prompt, L0, cosine, CE recovered, margin change),
their agreement with sae-lens's explained variance, the one-forward-per-batch streaming evaluation,
the sae-check runner and its figure."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mechmed.errors import MechmedError
from mechmed.sites import Site

D = 64


def _stats(xs, xhs, prompts_per_batch):
    """ReconstructionStats over batches: xs/xhs lists of [tokens, d]; prompt ids per batch."""
    from mechmed.fidelity import ReconstructionStats

    s = ReconstructionStats(sum(n for _, n in prompts_per_batch))
    offset = 0
    for x, xh, (idx, n) in zip(xs, xhs, prompts_per_batch):
        s.add(x, xh, torch.zeros(x.shape[0]), idx + offset)
        offset += n
    return s.summary()


def _batches(seed=0, n_batches=4, offset=30.0):
    """Activations with a large common offset (like a residual stream), 3 prompts per batch."""
    g = torch.Generator().manual_seed(seed)
    xs, idxs = [], []
    for _ in range(n_batches):
        lens = torch.randint(3, 9, (3,), generator=g)
        x = torch.randn(int(lens.sum()), D, generator=g) * torch.linspace(0.5, 2, D) + offset
        xs.append(x)
        idxs.append((torch.repeat_interleave(torch.arange(3), lens), 3))
    return xs, idxs


def test_predicting_the_mean_gives_zero():
    xs, idxs = _batches()
    mu = torch.cat(xs).double().mean(0)
    out = _stats(xs, [mu.expand_as(x).float() for x in xs], idxs)
    assert abs(out.r2_pooled) < 1e-6
    # per-prompt R² uses the global mean, so predicting it gives exactly 0 for every prompt too
    np.testing.assert_allclose(out.r2_per_prompt, 0.0, atol=1e-5)
    perfect = _stats(xs, xs, idxs)
    assert perfect.r2_pooled == pytest.approx(1.0)
    np.testing.assert_allclose(perfect.r2_per_prompt, 1.0)
    assert perfect.cosine == pytest.approx(1.0)


def test_per_prompt_r2_matches_direct_formula_and_is_batching_invariant():
    xs, idxs = _batches(seed=1)
    g = torch.Generator().manual_seed(5)
    xhs = [x + 0.3 * torch.randn(x.shape, generator=g) for x in xs]
    out = _stats(xs, xhs, idxs)
    X, XH = torch.cat(xs).double(), torch.cat(xhs).double()
    mu = X.mean(0)
    assert out.r2_pooled == pytest.approx(1 - float(((X - XH) ** 2).sum() / ((X - mu) ** 2).sum()), abs=1e-9)
    direct, start = [], 0
    for x, (idx, n) in zip(xs, idxs):
        for p in range(n):
            rows = torch.nonzero(idx == p).flatten() + start
            direct.append(1 - float(((X[rows] - XH[rows]) ** 2).sum() / ((X[rows] - mu) ** 2).sum()))
        start += x.shape[0]
    np.testing.assert_allclose(out.r2_per_prompt, direct, rtol=1e-5)
    # the same tokens in one batch give the same numbers
    one = _stats([X.float()], [XH.float()],
                 [(torch.cat([i + 3 * b for b, (i, _) in enumerate(idxs)]), 3 * len(idxs))])
    assert one.r2_pooled == pytest.approx(out.r2_pooled, abs=1e-9)
    np.testing.assert_allclose(one.r2_per_prompt, out.r2_per_prompt, rtol=1e-5)


def test_agrees_with_sae_lens_explained_variance():
    """sae-lens 6.x's ExplainedVarianceCalculator uses the set mean, as mechmed does; the old
    variance-about-zero formula differs by exactly the ratio of the two denominators."""
    from sae_lens.evals import ExplainedVarianceCalculator

    xs, idxs = _batches(seed=2, offset=3.0)
    g = torch.Generator().manual_seed(7)
    xhs = [x + 0.5 * torch.randn(x.shape, generator=g) for x in xs]
    calc = ExplainedVarianceCalculator()
    for x, xh in zip(xs, xhs):
        calc.add_batch(sae_output=xh, hidden_acts=x)
    ours = _stats(xs, xhs, idxs).r2_pooled
    assert ours == pytest.approx(calc.compute(), abs=1e-6)  # sae-lens squares in float32, mechmed in float64

    X, XH = torch.cat(xs).double(), torch.cat(xhs).double()
    ssr = float(((X - XH) ** 2).sum())
    about_mean, about_zero = float(((X - X.mean(0)) ** 2).sum()), float((X**2).sum())
    r2_zero = 1 - ssr / about_zero
    assert (1 - r2_zero) / (1 - ours) == pytest.approx(about_mean / about_zero, rel=1e-9)
    assert r2_zero - ours > 0.1  # with an offset the old formula overstates R² substantially


def test_explained_variance_helper():
    from mechmed.fidelity import explained_variance

    x = torch.randn(50, 8) + 4
    assert explained_variance(x, x.mean(0).expand_as(x)) == pytest.approx(0.0, abs=1e-9)
    assert explained_variance(x, x) == pytest.approx(1.0)


# ----------------------------------------------------------------------------- SAEs on a tiny model


def _jumprelu(W_enc, W_dec, b_enc, b_dec, threshold, layer):
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in, d_sae = W_enc.shape
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, apply_b_dec_to_input=False,
                                        metadata=SAEMetadata(hook_name=Site(layer).hook_name)))
    sae.load_state_dict({"W_enc": W_enc, "W_dec": W_dec, "b_enc": b_enc, "b_dec": b_dec, "threshold": threshold})
    return sae.eval()


def identity_sae(layer):
    """x̂ = relu(x) − relu(−x) = x exactly: a 2d-latent JumpReLU SAE with threshold 0."""
    eye = torch.eye(D)
    return _jumprelu(torch.cat([eye, -eye], 1), torch.cat([eye, -eye], 0), torch.zeros(2 * D), torch.zeros(D),
                     torch.zeros(2 * D), layer)


def constant_sae(layer, value):
    """Never fires; x̂ = b_dec = ``value`` for every token."""
    return _jumprelu(torch.zeros(D, 8), torch.zeros(8, D), torch.zeros(8), value, torch.ones(8), layer)


def noisy_sae(layer, seed):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    return TopKSAE(TopKSAEConfig(d_in=D, d_sae=32, k=4, metadata=SAEMetadata(hook_name=Site(layer).hook_name))).eval()


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(scope="module")
def small_sets():
    from mechmed.fidelity import PromptSet, prompt_set

    med = prompt_set("medical")
    img = prompt_set("images", n_images=6)
    return {"medical": PromptSet("medical", med.texts[:10]), "images": img}


def test_identity_sae_is_perfect_and_splices_cleanly(vlm, small_sets):
    from mechmed.fidelity import evaluate_saes

    saes = {L: identity_sae(L) for L in range(3)}
    for name, ps in small_sets.items():
        ev = evaluate_saes(vlm, saes, ps, batch_size=4, ce=True)
        for r in ev.rows:
            assert r["r2"] == pytest.approx(1.0, abs=1e-5) and r["r2_pooled"] == pytest.approx(1.0, abs=1e-5)
            assert r["cosine"] == pytest.approx(1.0, abs=1e-5)
            assert r["l0"] > 0
            assert r["ce_recon"] == pytest.approx(r["ce_clean"], abs=1e-4)
            assert abs(r["ce_zero"] - r["ce_clean"]) > 1e-3  # zero-ablation does change the loss
            assert r["ce_recovered"] == pytest.approx(1.0, abs=1e-3)
            if name == "images":
                assert r["margin_change"] == pytest.approx(0.0, abs=1e-4) and r["margin_flips"] == 0
            else:
                assert r["margin_change"] is None
            assert r["exceeds_threshold"] and r["p_value"] == 0.0


def test_mean_predicting_sae_scores_zero(vlm, small_sets):
    from mechmed.fidelity import evaluate_saes
    from mechmed.saes import collect_activations

    ps = small_sets["medical"]
    acts = collect_activations(vlm, [ps.inputs(vlm, 0, 4), ps.inputs(vlm, 4, 10)], [1])
    saes = {1: constant_sae(1, acts[1].double().mean(0).float())}
    row = evaluate_saes(vlm, saes, ps, batch_size=4, ce=False).rows[0]
    assert row["r2_pooled"] == pytest.approx(0.0, abs=1e-5)
    assert row["r2"] == pytest.approx(0.0, abs=1e-4)
    assert row["l0"] == 0 and not row["exceeds_threshold"] and row["p_value"] > 0.5


def test_one_forward_per_batch_whatever_the_layers(vlm, small_sets):
    from mechmed.fidelity import evaluate_saes

    calls = []
    handle = vlm.model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        ps = small_sets["medical"]  # 10 prompts, batches of 4 -> 3 batches
        for layers in ([1], [0, 1, 2]):
            calls.clear()
            ev = evaluate_saes(vlm, {L: noisy_sae(L, L) for L in layers}, ps, batch_size=4, ce=False)
            assert ev.n_batches == 3 and ev.n_forwards == 3 == len(calls)
            assert [r["layer"] for r in ev.rows] == layers
        calls.clear()
        ev = evaluate_saes(vlm, {L: noisy_sae(L, L) for L in (0, 2)}, ps, batch_size=4, ce=True)
        assert ev.n_forwards == len(calls) == 3 * (1 + 2 * 2)
        calls.clear()
        ev = evaluate_saes(vlm, {0: noisy_sae(0, 0)}, small_sets["images"], batch_size=4, ce=True)
        assert ev.n_forwards == len(calls) == 2 * (1 + 3)  # + the answer-position splice
    finally:
        handle.remove()


def test_rows_have_every_field(vlm, small_sets):
    from mechmed.fidelity import evaluate_saes

    ev = evaluate_saes(vlm, {0: noisy_sae(0, 3)}, small_sets["images"], batch_size=3, ce=True)
    r = ev.rows[0]
    for key in ("layer", "text_set", "r2", "r2_ci", "fvu", "l0", "cosine", "ce_recovered", "margin_change",
                "p_value", "exceeds_threshold", "n_prompts", "n_tokens"):
        assert key in r, key
    assert r["n_prompts"] == 6 and r["n_tokens"] > 6 and r["l0"] <= 4
    assert r["r2_ci"][0] <= r["r2"] <= r["r2_ci"][1]
    assert r["fvu"] == pytest.approx(1 - r["r2"])
    assert r["r2"] < 0.95 and not r["exceeds_threshold"]


def test_r2_by_token_type_is_each_types_own_explained_variance(vlm, small_sets):
    """``by_token_type`` on image prompts: every real token has one type; each type's pooled R² is
    explained_variance over that type's tokens alone (BOS included only in its own entry), by hand."""
    from mechmed.capture import hooks, image_token_mask
    from mechmed.fidelity import evaluate_saes, explained_variance, token_types

    ps = small_sets["images"]
    sae = noisy_sae(1, 7)
    row = evaluate_saes(vlm, {1: sae}, ps, batch_size=3, ce=False).rows[0]
    by = row["by_token_type"]
    assert set(by) == {"text", "image", "special", "bos"}
    batches = [ps.inputs(vlm, 0, 3), ps.inputs(vlm, 3, 6)]
    xs = {t: [] for t in by}
    for inputs in batches:
        types = token_types(vlm, inputs)
        real = inputs["attention_mask"].bool()
        total = sum(m.long() for m in types.values())
        assert torch.equal(total, real.long())  # one type per real token, none on padding
        assert torch.equal(types["image"], real & image_token_mask(vlm, inputs))
        out = {}
        with torch.no_grad(), hooks(vlm.model, vlm.family, {Site(1): lambda s, a, o=out: o.setdefault("a", a)}):
            vlm.model(**inputs, use_cache=False, logits_to_keep=1)
        for t, m in types.items():
            xs[t].append(out["a"][m])
    for t, parts in xs.items():
        x = torch.cat(parts)
        with torch.no_grad():
            x_hat = sae.decode(sae.encode(x))
        assert by[t]["n_tokens"] == x.shape[0]
        x64, e64 = x.double(), (x - x_hat).double()
        assert by[t]["relative_error"] == pytest.approx(float(e64.pow(2).sum() / x64.pow(2).sum()), rel=1e-6), t
        assert by[t]["rms_norm"] == pytest.approx(float(x64.pow(2).sum(-1).mean().sqrt()), rel=1e-6), t
        if t == "bos":  # one token at one position: the same residual in every prompt, no variance to explain
            assert by[t]["r2_pooled"] is None
        else:
            assert by[t]["r2_pooled"] == pytest.approx(explained_variance(x, x_hat), abs=1e-6), t
    assert sum(by[t]["n_tokens"] for t in ("text", "image", "special")) == row["n_tokens"]  # BOS outside


def test_nan_activations_are_named(vlm, small_sets):
    import copy

    from mechmed.fidelity import evaluate_saes
    from mechmed.models import ModelBundle

    model = copy.deepcopy(vlm.model)
    with torch.no_grad():
        model.model.language_model.layers[1].mlp.down_proj.weight.fill_(float("nan"))
    broken = ModelBundle(model, vlm.processor, vlm.family, vlm.answers, "broken")
    with pytest.raises(MechmedError, match=r"layer 1, text set medical, prompt 0: activations contain NaN"):
        evaluate_saes(broken, {0: identity_sae(0), 1: identity_sae(1)}, small_sets["medical"], ce=False)


def test_text_set_errors():
    from mechmed.fidelity import parse_text_sets, prompt_set

    assert parse_text_sets("medical, images") == ["medical", "images"]
    with pytest.raises(MechmedError, match="--texts radiology: unknown text set"):
        parse_text_sets("medical,radiology")
    with pytest.raises(MechmedError, match="listed twice"):
        parse_text_sets("medical,medical")
    with pytest.raises(MechmedError, match="unknown text set"):
        prompt_set("poetry")


def test_shipped_text_sets():
    from mechmed.data.texts import GENERAL, MEDICAL
    from mechmed.demo.prompts import image_question_prompts

    for texts in (MEDICAL, GENERAL):
        assert 50 <= len(texts) <= 100 and len(set(texts)) == len(texts)
        assert all(t.strip() and t[0].isupper() for t in texts)
    images, questions = image_question_prompts(5, seed=0)
    assert len(images) == len(questions) == 5 and all(q.endswith("?") for q in questions)
    assert image_question_prompts(5, seed=0)[1] == questions


def test_images_need_a_multimodal_model(tiny_bundles, small_sets):
    from mechmed.fidelity import evaluate_saes

    lm = tiny_bundles["Gemma3ForCausalLM"]
    with pytest.raises(MechmedError, match="takes no images"):
        evaluate_saes(lm, {0: identity_sae(0)}, small_sets["images"], ce=False)
    ev = evaluate_saes(lm, {0: identity_sae(0)}, small_sets["medical"], ce=False)
    assert ev.rows[0]["r2"] == pytest.approx(1.0, abs=1e-5)


# ----------------------------------------------------------------------------- the sae-check runner


@pytest.fixture(scope="module")
def check_dirs(tiny_workspace, tmp_path_factory):
    root = tmp_path_factory.mktemp("saecheck")
    for L in range(3):
        (identity_sae(L) if L != 1 else noisy_sae(L, 1)).save_model(str(root / "saes" / f"layer_{L}"))
    return tiny_workspace[1], root


def test_run_sae_check_writes_json_and_figure(check_dirs):
    from mechmed.stages import run_sae_check

    ckpt, root = check_dirs
    res = run_sae_check(model=str(ckpt), saes=str(root / "saes"), layers="all", texts="medical,general",
                        out=str(root / "out"), threshold=0.95, batch_size=16, ce=True)
    data = json.loads((root / "out" / "sae_check.json").read_text())
    assert data["options"]["texts"] == "medical,general" and data["version"] == 1
    assert [(r["text_set"], r["layer"]) for r in data["rows"]] == [
        ("medical", 0), ("medical", 1), ("medical", 2), ("general", 0), ("general", 1), ("general", 2)]
    by = {(r["text_set"], r["layer"]): r for r in data["rows"]}
    assert by["medical", 0]["exceeds_threshold"] and not by["medical", 1]["exceeds_threshold"]
    assert by["general", 2]["margin_change"] is None  # text prompts have no yes/no margin (images: see above)
    assert data["cost"]["medical"]["forwards_per_batch"] == 1 + 2 * 3
    assert (root / "out" / "r2_by_layer.html").stat().st_size > 100_000  # plotly.js inlined
    assert res.figures["png"] or res.figures["png_skipped"]
    assert "layer" in res.table()


def test_images_prompt_set_only_where_the_source_ships_one(check_dirs, monkeypatch):
    from mechmed import models
    from mechmed.fidelity import default_texts
    from mechmed.stages import run_sae_check

    ckpt, root = check_dirs
    assert default_texts("demo") == "medical,general,images"
    assert default_texts(str(ckpt)) == "medical,general"

    def no_load(*a, **k):
        raise AssertionError("weights loaded before the prompt sets were checked")

    monkeypatch.setattr(models, "load_model", no_load)
    with pytest.raises(MechmedError, match="ships no image prompts"):
        run_sae_check(model=str(ckpt), saes=str(root / "saes"), texts="medical,images", out=str(root / "img"))
    assert not (root / "img").exists()


@pytest.mark.parametrize("kw,match", [
    ({"texts": "medical,poetry"}, "unknown text set"),
    ({"layers": "7"}, "out of range"),
    ({"layers": "0,9"}, "out of range"),
    ({"threshold": "x"}, "--threshold"),
    ({"batch_size": 0}, "--batch-size"),
])
def test_run_sae_check_errors(check_dirs, kw, match):
    from mechmed.stages import run_sae_check

    ckpt, root = check_dirs
    args = dict(model=str(ckpt), saes=str(root / "saes"), out=str(root / "err"), texts="medical", ce=False)
    with pytest.raises(MechmedError, match=match):
        run_sae_check(**{**args, **kw})


def test_run_sae_check_rejects_wrong_width(check_dirs, tmp_path):
    from mechmed.stages import run_sae_check

    ckpt, _ = check_dirs
    noisy = noisy_sae(0, 0)
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    TopKSAE(TopKSAEConfig(d_in=32, d_sae=16, k=2, metadata=SAEMetadata(hook_name="blocks.0.hook_resid_post"))
            ).save_model(str(tmp_path / "saes" / "layer_0"))
    assert noisy.cfg.d_in == D
    with pytest.raises(MechmedError, match=r"layer 0.*d_in=32.*width 64"):
        run_sae_check(model=str(ckpt), saes=str(tmp_path / "saes"), out=str(tmp_path / "o"), texts="medical")


# ----------------------------------------------------------------------------- figures


def test_r2_by_layer_figure():
    from mechmed.figures import r2_by_layer

    rows = [{"layer": L, "text_set": s, "r2": 0.97 - 0.01 * L, "r2_ci": [0.96 - 0.01 * L, 0.98 - 0.01 * L],
             "n_prompts": 70, "exceeds_threshold": L < 2, "p_value": 0.01, "l0": 20.0}
            for s in ("medical", "general") for L in range(4)]
    fig = r2_by_layer(rows, 0.95)
    shown = [t.name for t in fig.data if t.showlegend is not False]
    assert shown == ["medical text (n=70)", "general text (n=70)"]
    assert fig.layout.shapes[0].y0 == 0.95  # the threshold line
    lo, hi = fig.layout.yaxis.range
    assert lo < 0.93 and 0.95 < hi <= 1.01
    assert list(fig.data[0].error_y.array) == pytest.approx([0.01] * 4)
    assert list(fig.data[0].marker.color[2:]) == ["white", "white"]  # open markers where the test fails


def test_save_figure_html_and_png(tmp_path, monkeypatch, caplog):
    import logging

    import plotly.graph_objects as go

    from mechmed import figures

    fig = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    monkeypatch.setattr(figures, "browser_path", lambda: None)
    with caplog.at_level(logging.WARNING, logger="mechmed.figures"):
        out = figures.save_figure(fig, tmp_path / "a")
    assert out["png"] is None and "Chromium" in out["png_skipped"] and "PNG skipped" in caplog.text
    assert (tmp_path / "a.html").read_text().count("<script") >= 1 and not (tmp_path / "a.png").exists()
