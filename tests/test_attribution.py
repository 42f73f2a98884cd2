"""Attribution on a tiny real model, checked against finite differences and exact patching."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats as sps

from conftest import make_image
from mechmed.attribution import attribute, attribute_batch, delta_patch
from mechmed.data.records import ParaphrasePair


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from mechmed import tiny
    from mechmed.models import bundle

    model, proc = tiny.gemma3_vlm(layers=4, seed=5, initializer_range=0.2)
    b = bundle(model.double(), proc)
    root = tmp_path_factory.mktemp("attr")
    pairs = []
    for i in range(3):
        path = root / f"{i}.png"
        make_image(300 + i).save(path)
        pairs.append(ParaphrasePair(f"p{i}", "Is there a pleural effusion?",
                                    ["Does this image show effusion?", "Is there any effusion?",
                                     "Is the heart normal?"][i], "yes", image=path))
    pairs.append(ParaphrasePair("neg", "Is there edema?", "Is there no edema?", "yes", image=root / "0.png",
                                paraphrase_answer="no"))
    return b, pairs


class LinearSAE:
    """A stand-in SAE with the two things attribution uses: encode() and W_dec."""

    def __init__(self, d, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.W_enc = torch.randn(d, n, generator=g, dtype=torch.float64)
        self.W_dec = torch.randn(n, d, generator=g, dtype=torch.float64) / n**0.5

    def encode(self, x):
        return torch.relu(x.double() @ self.W_enc)


def test_layer_attribution_equals_finite_difference(setup):
    from mechmed.attribution import _inputs, _margin
    from mechmed.sites import Site

    b, pairs = setup
    res = attribute_batch(b, pairs[:2], exact=True)
    assert len(res) == 2
    for r, p in zip(res, pairs):
        # the last layer's residual fixes the logits: exact patching there recovers everything
        assert r.patch_effect[-1] == pytest.approx(r.m_q - r.m_p, abs=1e-9)
        # central finite difference along x_q − x_p at each layer (float64 weights; transformers
        # returns float32 logits, so eps stays large enough for their precision)
        from mechmed.consistency import load_image

        img = load_image(p.image)
        both = _inputs(b, [p.question, p.paraphrase], [img, img])
        p_in = _inputs(b, [p.paraphrase], [img])
        for layer in range(b.n_layers):
            store = {}
            _margin(b, both, {Site(layer): lambda s, a, store=store: store.__setitem__("x", a[:, -1].clone())})
            dx = store["x"][0] - store["x"][1]
            eps = 1e-2

            def shift(s, a, e, dx=dx):
                a = a.clone()
                a[:, -1] = a[:, -1] + e * dx
                return a

            up = _margin(b, p_in, {Site(layer): lambda s, a, e=eps: shift(s, a, e)})[0].item()
            down = _margin(b, p_in, {Site(layer): lambda s, a, e=-eps: shift(s, a, e)})[0].item()
            assert r.layer_attr[layer] == pytest.approx((up - down) / (2 * eps), rel=2e-3, abs=1e-4)


class IdentitySAE:
    """encode(x) = x, W_dec = I: feature attributions must add up to the layer attribution."""

    def __init__(self, d):
        self.W_dec = torch.eye(d, dtype=torch.float64)

    def encode(self, x):
        return x.double()


def test_negated_pairs_are_skipped_and_features_by_hand(setup):
    b, pairs = setup
    res = attribute(b, pairs, saes={1: LinearSAE(b.d_model, 32), 2: IdentitySAE(b.d_model)}, batch_size=2)
    assert [r.id for r in res] == ["p0", "p1", "p2"]
    from mechmed.attribution import _inputs
    from mechmed.capture import capture
    from mechmed.consistency import load_image
    from mechmed.sites import Site

    p = pairs[0]
    img = load_image(p.image)
    acts, _ = capture(b, _inputs(b, [p.question, p.paraphrase], [img, img]), [Site(1)])
    f = LinearSAE(b.d_model, 32).encode(acts[Site(1)][:, -1])
    np.testing.assert_allclose(res[0].features[1]["f_q"], f[0].numpy(), atol=1e-9)
    np.testing.assert_allclose(res[0].features[1]["f_p"], f[1].numpy(), atol=1e-9)
    for r in res:
        assert r.features[2]["attr"].sum() == pytest.approx(r.layer_attr[2], rel=1e-9, abs=1e-12)


def test_delta_patch_matches_a_manual_hooked_run(setup):
    from mechmed.attribution import _inputs, _margin
    from mechmed.consistency import load_image
    from mechmed.sites import Site

    b, pairs = setup
    sae = LinearSAE(b.d_model, 16, seed=1)
    p = pairs[1]
    rec = delta_patch(b, p, 2, sae, [0, 3, 5])
    img = load_image(p.image)
    both = _inputs(b, [p.question, p.paraphrase], [img, img])
    store = {}
    m = _margin(b, both, {Site(2): lambda s, a: store.__setitem__("x", a[:, -1].clone())}).numpy()
    f = sae.encode(store["x"])
    for value, i in zip(rec, [0, 3, 5]):
        shift = (f[1, i] - f[0, i]) * sae.W_dec[i]

        def patch(s, a, shift=shift):
            a = a.clone()
            a[:, -1] -= shift
            return a

        mp = _margin(b, _inputs(b, [p.paraphrase], [img]), {Site(2): patch})[0].item()
        assert value == pytest.approx((mp - m[1]) / (m[0] - m[1]), rel=1e-6)


def test_layer_scores_and_feature_table(setup):
    from mechmed.attribution import feature_table, layer_scores

    b, pairs = setup
    res = attribute(b, pairs, saes={1: LinearSAE(b.d_model, 32)}, exact=True)
    res[0].flipped, res[1].flipped, res[2].flipped = True, False, True  # force both groups
    s = layer_scores(res, n_bootstrap=200)
    assert s["n_layers"] == b.n_layers and s["n_flipped"] == 2
    by_hand = np.mean([abs(res[0].layer_attr[2]), abs(res[2].layer_attr[2])])
    assert s["scores"]["attr_flipped"]["mean"][2] == pytest.approx(by_hand)
    lo, hi = s["scores"]["attr_flipped"]["ci"][2]
    assert lo <= by_hand <= hi
    gain = np.mean([abs(res[i].layer_attr[2]) - abs(res[i].layer_attr[1]) for i in (0, 2)])
    assert s["scores"]["gain_flipped"]["mean"][2] == pytest.approx(gain)
    assert s["scores"]["gain_all"]["mean"][0] == pytest.approx(np.mean([abs(r.layer_attr[0]) for r in res]))
    rec = [res[i].patch_effect[-1] / res[i].gap for i in (0, 2)]
    assert s["scores"]["recovery_flipped"]["mean"][-1] == pytest.approx(np.mean(rec)) == pytest.approx(1.0)
    assert -1 <= s["spearman_attr_patch"] <= 1
    # the check of the selection's score: what enters at each layer, by attribution and by exact patching
    patch = np.array(s["scores"]["patch_flipped"]["mean"])
    patch_gain = np.diff(patch, prepend=0.0)
    assert s["spearman_gain_patch"] == pytest.approx(
        sps.spearmanr(s["scores"]["gain_flipped"]["mean"], patch_gain).statistic, abs=1e-12)
    assert s["spearman_index_patch"] == pytest.approx(sps.spearmanr(np.arange(b.n_layers), patch_gain).statistic,
                                                      abs=1e-12)
    rows = feature_table(res, top=3)
    assert len(rows) == 3 and all(r["layer"] == 1 for r in rows)
    assert rows[0]["mean_abs_attr"] >= rows[1]["mean_abs_attr"] >= rows[2]["mean_abs_attr"]
