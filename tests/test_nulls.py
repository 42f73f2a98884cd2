"""Matched null controls (mechmed.nulls): the cached last-token path against the full forward on
tiny real models, the statistics by hand, and the null's draws against their definition."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mechmed import interventions as iv
from mechmed import nulls
from mechmed.data import load_pairs
from mechmed.errors import MechmedError
from mechmed.readout import margins, pair_images
from mechmed.sites import Site


@pytest.fixture(scope="module")
def setup(tiny_workspace):
    from mechmed.models import load_model

    root, ckpt = tiny_workspace
    return load_model(str(ckpt)), load_pairs(root / "pairs.jsonl")


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def _sae(bundle, layer: int, seed: int = 0):
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    return TopKSAE(TopKSAEConfig(d_in=bundle.d_model, d_sae=48, k=8,
                                 metadata=SAEMetadata(hook_name=Site(layer).hook_name))).eval()


def test_the_cached_last_token_path_gives_the_full_forward_margins(setup):
    """No edit, and steering at a middle layer by 1 and by 2 vectors: the prefix cached once and the
    last token run alone (edits two at a time, so one step holds edits 0-1 and the next edit 2) give
    the margins of the full forward, to 1e-4, with left padding and images."""
    bundle, pairs = setup
    imgs = pair_images(pairs)
    texts = [p.paraphrase for p in pairs] + ["Is the heart enlarged on this film?"] * 2
    imgs = imgs + imgs[:2]
    torch.manual_seed(0)
    vec = torch.randn(bundle.d_model)

    def add(site, x, prompts, edits):
        return x + edits.float()[:, None].to(x.dtype) * vec

    got = nulls.margins_under_edits(bundle, texts, imgs, 3, {Site(1): add}, batch_size=4, edits_per_step=2)
    np.testing.assert_allclose(got[0], margins(bundle, texts, imgs, batch_size=4).numpy(), atol=1e-4)
    rows = [type("P", (), {"negated": False})() for _ in texts]
    for k in (1, 2):
        full = iv.Steering(vec, layer=1, scale=float(k)).margins(bundle, texts, imgs, role="paraphrase", rows=rows,
                                                                 batch_size=4).numpy()
        np.testing.assert_allclose(got[k], full, atol=1e-4)
    assert np.abs(got[1] - got[0]).max() > 1e-3  # the edit did something


def test_null_stats_by_hand():
    s = nulls.null_stats(5, 1, [1, 5, 7, 2], [0, 3, 1, 1])
    assert s["reversed"] == {"arm": 5, "mean": 3.75, "sd": pytest.approx(np.std([1, 5, 7, 2], ddof=1)), "best": 7,
                             "p": (1 + 2) / 5}
    assert s["net"]["arm"] == 4 and s["net"]["best"] == 6 and s["net"]["p"] == (1 + 1) / 5  # draws' nets 1, 2, 6, 1
    assert s["new_flips"]["p"] == (1 + 3) / 5


def test_pooled_null_sums_draw_j_over_seeds():
    def one(seed, arm_r, dr):
        return {"arm": "steer", "draws": 3, "seed": seed, "n_pairs": 10, "n_base_flips": 4, "null": "x",
                "edit_norm": {"arm": 1.0, "null_mean": 1.0}, "draws_reversed": dr, "draws_new_flips": [0, 0, 0],
                **nulls.null_stats(arm_r, 0, dr, [0, 0, 0])}

    pooled = nulls.pool_nulls([one(0, 2, [0, 1, 2]), one(1, 3, [1, 0, 4])])
    assert pooled["reversed"]["arm"] == 5 and pooled["reversed"]["best"] == 6 and pooled["reversed"]["mean"] == 8 / 3
    assert pooled["reversed"]["p"] == (1 + 1) / 4 and pooled["seeds"] == [0, 1] and pooled["n_base_flips"] == 8
    assert nulls.pool_nulls([one(0, 2, [0, 1, 2]), None]) is None
    a, b = one(0, 2, [0, 1, 2]), one(1, 3, [1, 0, 4])
    a["scaled"], b["scaled"] = one(0, 2, [2, 2, 2]), one(1, 3, [0, 5, 1])
    scaled = nulls.pool_nulls([a, b])["scaled"]
    assert scaled["draws_reversed"] == [2, 7, 3] and scaled["reversed"]["p"] == (1 + 1) / 4
    # seeds on the same pairs: one arm count against all the seeds' draws (summing would count pairs twice)
    a, b = one(0, 2, [0, 1, 2]), one(1, 2, [1, 0, 4])
    same = nulls.pool_nulls([a, b], shared=True)
    assert same["reversed"]["arm"] == 2 and same["draws"] == 6 and same["draws_reversed"] == [0, 1, 2, 1, 0, 4]
    assert same["reversed"]["p"] == (1 + 2) / 7 and same["unit"] == "pair" and same["n_base_flips"] == 4


def test_edits_per_step_keeps_the_repeated_cache_under_budget():
    layer = type("L", (), {"keys": torch.zeros(2, 4, 10, 8), "values": torch.zeros(2, 4, 10, 8)})()
    cache = type("C", (), {"layers": [layer, layer]})()  # 4 tensors of 2,560 bytes
    assert nulls._edits_per_step(cache, 64, budget=10_240 * 5) == 5
    assert nulls._edits_per_step(cache, 4, budget=1e12) == 4 and nulls._edits_per_step(cache, 64, 1) == 1
    assert nulls._edits_per_step(object(), 64, 1) == 64  # a cache it cannot measure: the cap alone


def test_clamp_and_steer_nulls_score_the_arm_as_its_evaluation_does(setup):
    """The arm's own count comes from the margins its full evaluation gives; the clamp null's features
    fire on the questions, sit at the arm's layers in its numbers, and leave its own out; a steering
    null has the fitted vector's norm."""
    from mechmed.consistency import evaluate

    bundle, pairs = setup
    saes = {0: _sae(bundle, 0), 1: _sae(bundle, 1, 1)}
    clamp = iv.Clamp(saes, {0: [2, 5], 1: [7]}, "original")
    res = nulls.null_control(bundle, clamp, pairs, draws=6, seed=3)
    assert res["max_abs_diff_full"] < 1e-4 and res["draws"] == 6 and len(res["draws_reversed"]) == 6
    ev = evaluate(bundle, pairs, edit=clamp, controls=False, n_bootstrap=20)
    plain = evaluate(bundle, pairs, controls=False, n_bootstrap=20)
    head = [i for i, p in enumerate(pairs) if not p.in_negation_set]
    base = np.array([plain.pairs[i]["flip"] for i in head])
    armf = np.array([ev.pairs[i]["flip"] for i in head])
    assert res["reversed"]["arm"] == int((base & ~armf).sum()) and res["n_base_flips"] == int(base.sum())
    assert res["new_flips"]["arm"] == int((~base & armf).sum())
    imgs = pair_images(pairs)
    h = iv.answer_residuals(bundle, [p.question for p in pairs], imgs, [0, 1])
    for drawn in res["features"]:
        assert {k: len(v) for k, v in drawn.items()} == {"0": 2, "1": 1}
        for layer, idx in drawn.items():
            fires = (saes[int(layer)].encode(h[int(layer)]) != 0).any(0)
            assert all(bool(fires[i]) for i in idx) and not set(idx) & set(clamp.features[int(layer)])
    # the scaled null: the same features, each change as large as the clamp's at that prompt and layer
    assert res["scaled"]["edit_norm"]["null_mean"] <= res["edit_norm"]["arm"] * (1 + 1e-5)
    assert res["scaled"]["edit_norm"]["null_mean"] >= res["edit_norm"]["null_mean"] or \
        res["edit_norm"]["null_mean"] > res["edit_norm"]["arm"]
    assert len(res["scaled"]["draws_reversed"]) == 6
    again = nulls.null_control(bundle, clamp, pairs, draws=6, seed=3, check_full=False)
    assert again["draws_reversed"] == res["draws_reversed"] and again["features"] == res["features"]
    assert "max_abs_diff_full" not in again
    # the arm's own evaluated margins as the reference: no second full forward
    ref = {p.id: r["margin_paraphrase"] for p, r in zip(pairs, ev.pairs)}
    assert nulls.null_control(bundle, clamp, pairs, draws=2, seed=3, reference=ref)["max_abs_diff_full"] < 1e-4

    steer = iv.fit_steering(bundle, pairs, 1, scale=1.5)
    s = nulls.null_control(bundle, steer, pairs, draws=4, seed=0)
    assert s["edit_norm"]["null_mean"] == pytest.approx(s["edit_norm"]["arm"], rel=1e-5) and "scaled" not in s
    assert s["edit_norm"]["arm"] == pytest.approx(1.5 * float(steer.vector.norm()), rel=1e-5)
    assert s["max_abs_diff_full"] < 1e-4


def test_null_errors(setup):
    bundle, pairs = setup
    with pytest.raises(MechmedError, match="clamp_to: original"):
        nulls.null_control(bundle, iv.Clamp({0: _sae(bundle, 0)}, {0: [1]}, "zero"), pairs, draws=2)
    with pytest.raises(MechmedError, match="at least 1"):
        nulls.null_control(bundle, iv.Steering(torch.ones(bundle.d_model), 0), pairs, draws=0)
    with pytest.raises(MechmedError, match="not ensemble"):
        nulls.null_control(bundle, iv.Ensemble(3), pairs, draws=2)


@pytest.mark.parametrize("name", ["Gemma3ForConditionalGeneration", "Gemma3ForCausalLM",
                                  "Qwen2_5_VLForConditionalGeneration"])
def test_the_cached_path_on_every_family(tiny_bundles, name):
    """Each supported family, with images where it takes them: the cached last-token margins are the
    full forward's (to 1e-4), left padding included."""
    from conftest import make_image

    b = tiny_bundles[name]
    texts = ["Is there a nodule?", "Is the cardiac silhouette enlarged on this radiograph?", "Any effusion?"]
    imgs = [make_image(i) for i in range(len(texts))] if b.multimodal else None
    got = nulls.margins_under_edits(b, texts, imgs, 3, {}, batch_size=3, edits_per_step=2)  # cache repeated ×2, ×1
    for row in got:
        np.testing.assert_allclose(row, margins(b, texts, imgs, batch_size=3).numpy(), atol=1e-4)
