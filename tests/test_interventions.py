"""Training-free fixes on a tiny real Gemma 3 VLM, each checked against what it must give by
construction: a steering vector fitted on one pair at the last layer turns the paraphrase's final
residual into the question's (so their margins agree); clamping every latent of an exact SAE does
the same, or zeroes the residual (margin log #yes − log #no ids); ensembling is the mean of plain
margins."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from mechmed import interventions as iv
from mechmed.consistency import evaluate
from mechmed.data import load_pairs
from mechmed.errors import MechmedError
from mechmed.readout import margins
from mechmed.sites import Site


@pytest.fixture(scope="module")
def setup(tiny_workspace):
    from mechmed.models import load_model

    root, ckpt = tiny_workspace
    bundle = load_model(str(ckpt))
    pairs = load_pairs(root / "pairs.jsonl")
    return bundle, pairs


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


def identity_sae(layer: int, d: int):
    """x̂ = relu(x) − relu(−x) = x: a JumpReLU SAE with 2d latents, threshold 0."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    eye = torch.eye(d)
    sae = JumpReLUSAE(JumpReLUSAEConfig(d_in=d, d_sae=2 * d, apply_b_dec_to_input=False,
                                        metadata=SAEMetadata(hook_name=Site(layer).hook_name)))
    sae.load_state_dict({"W_enc": torch.cat([eye, -eye], 1), "W_dec": torch.cat([eye, -eye], 0),
                         "b_enc": torch.zeros(2 * d), "b_dec": torch.zeros(d), "threshold": torch.zeros(2 * d)})
    return sae.eval()


def _plain(bundle, pairs):
    from mechmed.data.images import load_image

    imgs = [load_image(p.image) for p in pairs]
    return (margins(bundle, [p.question for p in pairs], imgs).numpy(),
            margins(bundle, [p.paraphrase for p in pairs], imgs).numpy(), imgs)


def test_steering_fitted_on_one_pair_at_the_last_layer_makes_its_paraphrase_answer_as_the_question(setup):
    bundle, pairs = setup
    last = bundle.n_layers - 1
    one = [p for p in pairs if not p.negated][:1]
    steer = iv.fit_steering(bundle, one, last)
    hq = iv.answer_residuals(bundle, [one[0].question], _plain(bundle, one)[2], [last])[last][0]
    hp = iv.answer_residuals(bundle, [one[0].paraphrase], _plain(bundle, one)[2], [last])[last][0]
    assert torch.allclose(steer.vector, hq - hp, atol=1e-6) and steer.n_fit == 1
    # the residual the steering reads is the one output_hidden_states gives before the final norm
    m_q, m_p, _ = _plain(bundle, one)
    ev = evaluate(bundle, one, edit=steer, controls=False, n_bootstrap=50).pairs[0]
    assert ev["margin_question"] == pytest.approx(float(m_q[0]), abs=1e-5)  # the question runs as it is
    assert ev["margin_paraphrase"] == pytest.approx(float(m_q[0]), abs=1e-4)
    assert abs(float(m_p[0]) - float(m_q[0])) > 1e-3  # it did move the paraphrase
    # half the vector: the margin is not the question's (the edit is linear in scale, the readout is not fixed)
    half = iv.Steering(steer.vector, last, 0.5)
    assert evaluate(bundle, one, edit=half, controls=False, n_bootstrap=50).pairs[0]["margin_paraphrase"] != \
        pytest.approx(float(m_q[0]), abs=1e-4)


def test_steering_vector_is_the_mean_difference_over_meaning_preserving_pairs(setup):
    bundle, pairs = setup
    layer = 1
    steer = iv.fit_steering(bundle, pairs, layer)
    kept = [p for p in pairs if not p.negated]
    diffs = []
    for p in kept:  # one prompt at a time through output_hidden_states: an independent reading
        from mechmed.data.images import load_image
        from mechmed.readout import build_inputs

        out = {}
        for role, text in (("q", p.question), ("p", p.paraphrase)):
            inputs = build_inputs(bundle.processor, [text], [load_image(p.image)])
            with torch.no_grad():
                hs = bundle.model(**inputs, output_hidden_states=True).hidden_states
            out[role] = hs[layer + 1][0, -1]
        diffs.append(out["q"] - out["p"])
    assert steer.n_fit == len(kept)
    assert torch.allclose(steer.vector, torch.stack(diffs).mean(0), atol=1e-4)


def test_clamping_every_latent_of_an_exact_sae(setup):
    bundle, pairs = setup
    last = bundle.n_layers - 1
    sae = identity_sae(last, bundle.d_model)
    every = {last: list(range(2 * bundle.d_model))}
    m_q, m_p, _ = _plain(bundle, pairs)
    # to the original: the paraphrase's last residual becomes the question's, so the margins agree
    ev = evaluate(bundle, pairs, edit=iv.Clamp({last: sae}, every, "original"), controls=False, n_bootstrap=50)
    got_q = np.array([r["margin_question"] for r in ev.pairs])
    got_p = np.array([r["margin_paraphrase"] for r in ev.pairs])
    np.testing.assert_allclose(got_q, m_q, atol=1e-5)
    np.testing.assert_allclose(got_p, m_q, atol=1e-4)
    assert ev.metrics["flip_rate"] == 0.0 and not any(p.in_negation_set for p in pairs)  # agree: nothing flips
    # to zero: the residual is 0, RMSNorm keeps it 0, and every logit is 0: margin log #yes − log #no
    ev0 = evaluate(bundle, pairs, edit=iv.Clamp({last: sae}, every, "zero"), controls=False, n_bootstrap=50)
    expected = math.log(len(bundle.answers.yes_ids)) - math.log(len(bundle.answers.no_ids))
    for r in ev0.pairs:
        assert r["margin_question"] == pytest.approx(expected, abs=1e-5)
        assert r["margin_paraphrase"] == pytest.approx(expected, abs=1e-5)


def test_clamp_of_a_few_latents_is_the_decoder_difference(setup):
    """Clamping latents i to values t adds Σᵢ (tᵢ − fᵢ(x))·W_dec[i] at the answer position: at the
    last layer, by hand through the model's final norm and output head."""
    bundle, pairs = setup
    last = bundle.n_layers - 1
    torch.manual_seed(0)
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    sae = TopKSAE(TopKSAEConfig(d_in=bundle.d_model, d_sae=32, k=8,
                                metadata=SAEMetadata(hook_name=Site(last).hook_name))).eval()
    feats = {last: [3, 7, 11]}
    _, _, imgs = _plain(bundle, pairs)
    x = iv.answer_residuals(bundle, [p.paraphrase for p in pairs], imgs, [last])[last]
    with torch.no_grad():
        f = sae.encode(x)[:, feats[last]]
        edited = x - f @ sae.W_dec[feats[last]]  # to zero
        lm = bundle.model.get_decoder() if hasattr(bundle.model, "get_decoder") else bundle.model.model
        norm = getattr(lm, "norm", None) or lm.language_model.norm
        logits = bundle.model.get_output_embeddings()(norm(edited))
        cap = getattr(bundle.model.config.get_text_config(), "final_logit_softcapping", None)
        if cap:
            logits = torch.tanh(logits / cap) * cap
    yes = torch.logsumexp(logits[:, list(bundle.answers.yes_ids)], -1)
    no = torch.logsumexp(logits[:, list(bundle.answers.no_ids)], -1)
    ev = evaluate(bundle, pairs, edit=iv.Clamp({last: sae}, feats, "zero"), controls=False, n_bootstrap=50)
    np.testing.assert_allclose([r["margin_paraphrase"] for r in ev.pairs], (yes - no).numpy(), atol=1e-4)


def test_ensemble_is_the_mean_of_plain_margins_over_disjoint_phrasings(setup):
    """Each pair's question and paraphrase average over phrasings they do not share: the pair's other
    paraphrases dealt alternately (never the pair's own paraphrase on the question's side); the
    canonical question (accuracy) over k − 1 of all its paraphrases; all by hand from plain margins."""
    bundle, pairs = setup
    extra = [dataclasses.replace(p, id=p.id + "x", paraphrase=p.question + " Please answer.") for p in pairs[:4]]
    pairs = pairs + extra  # 3 and 4 phrasings per question: something to deal
    m_q, m_p, _ = _plain(bundle, pairs)
    ens = iv.Ensemble(k=3)
    ev = evaluate(bundle, pairs, edit=ens, controls=False, n_bootstrap=50)
    index = {p.id: i for i, p in enumerate(pairs)}
    for i, (p, r) in enumerate(zip(pairs, ev.pairs)):
        q_side, p_side = ens._deal(p)
        assert not {o.id for o in q_side} & {o.id for o in p_side} and p.id not in {o.id for o in q_side + p_side}
        group = [o for o in pairs if (o.image, o.question) == (p.image, p.question) and o.id != p.id]
        assert len(q_side) == min(2, (len(group) + 1) // 2) and len(q_side) + len(p_side) == min(4, len(group))
        assert r["margin_question"] == pytest.approx(np.mean([m_q[i], *(m_p[index[o.id]] for o in q_side)]), abs=1e-5)
        assert r["margin_paraphrase"] == pytest.approx(np.mean([m_p[i], *(m_p[index[o.id]] for o in p_side)]),
                                                       abs=1e-5)
    # the canonical question: itself and k − 1 = 2 of its paraphrases
    keys = list(dict.fromkeys((p.image, p.question) for p in pairs))
    unique = {k: m_q[next(i for i, p in enumerate(pairs) if (p.image, p.question) == k)] for k in keys}
    correct = 0
    for key in keys:
        pool = [(p.paraphrase, 1.0) for p in pairs if (p.image, p.question) == key]
        qid = next(p.question_id for p in pairs if (p.image, p.question) == key)
        drawn = iv._draw(pool, 2, f"q|{key[1]}|{qid}")
        by_text = {p.paraphrase: m_p[i] for i, p in enumerate(pairs) if (p.image, p.question) == key}
        value = np.mean([unique[key], *(by_text[t] for t, _ in drawn)])
        answer = next(p.answer for p in pairs if (p.image, p.question) == key)
        correct += (value > 0) == (answer == "yes")
    assert ev.metrics["accuracy"]["original"] == pytest.approx(correct / len(keys))


def test_ensemble_draws_do_not_depend_on_where_the_data_lives(setup, tmp_path):
    """The same pairs with their images in another directory (another machine's cache): the same
    phrasings drawn for every prompt, the canonical questions' included; with and without question ids."""
    import shutil

    class Recording(iv.Ensemble):
        def _mean_margins(self, bundle, plans, images, batch_size, progress):
            self.drawn = [*getattr(self, "drawn", []), *([t for t, _ in plan] for plan in plans)]
            return super()._mean_margins(bundle, plans, images, batch_size, progress)

    bundle, pairs = setup
    # six phrasings per question, so that a draw of one of them differs between seeds
    pairs = pairs + [dataclasses.replace(p, id=f"{p.id}v{j}", paraphrase=f"{p.question} Variant {j}.")
                     for p in pairs[::2] for j in range(5)]
    for strip_ids in (False, True):
        here = [dataclasses.replace(p, question_id="") if strip_ids else p for p in pairs]
        moved_dir = tmp_path / f"copy{int(strip_ids)}" / "deeper"
        moved_dir.mkdir(parents=True)
        moved = []
        for p in here:
            target = moved_dir / p.image.name
            if not target.exists():
                shutil.copy(p.image, target)
            moved.append(dataclasses.replace(p, image=target))
        a, b = Recording(k=2), Recording(k=2)
        ev_a = evaluate(bundle, here, edit=a, controls=False, n_bootstrap=20)
        ev_b = evaluate(bundle, moved, edit=b, controls=False, n_bootstrap=20)
        assert a.drawn == b.drawn and len({tuple(d) for d in a.drawn}) > 4
        assert ev_a.metrics["accuracy"] == ev_b.metrics["accuracy"]


def test_edits_toward_the_original_leave_negated_pairs_alone(setup):
    """A paraphrase that inverts the answer must not be pulled toward the question's answer: steer
    and clamp-to-original leave its margin as the plain model's."""
    bundle, pairs = setup
    last = bundle.n_layers - 1
    neg = [dataclasses.replace(p, id=p.id + "n", paraphrase="Is the chest normal?",
                               paraphrase_answer="no" if p.answer == "yes" else "yes") for p in pairs[:3]]
    mixed = pairs[:3] + neg
    assert [p.negated for p in mixed] == [False] * 3 + [True] * 3
    _, m_p, _ = _plain(bundle, mixed)
    steer = iv.fit_steering(bundle, pairs[:1], last)
    sae = identity_sae(last, bundle.d_model)
    clamp = iv.Clamp({last: sae}, {last: list(range(2 * bundle.d_model))}, "original")
    for edit in (steer, clamp):
        got = [r["margin_paraphrase"] for r in evaluate(bundle, mixed, edit=edit, controls=False, n_bootstrap=50).pairs]
        np.testing.assert_allclose(got[3:], m_p[3:], atol=1e-5)
        assert not np.allclose(got[:3], m_p[:3], atol=1e-4)


def test_ensemble_draws_are_fixed_and_k_sized():
    pool = list(range(10))
    a = iv._draw(pool, 3, "p|x")
    assert a == iv._draw(pool, 3, "p|x") and len(set(a)) == 3 and set(a) <= set(pool)
    assert iv._draw(pool[:2], 3, "p|x") == [0, 1]


def test_errors(setup, tmp_path):
    bundle, pairs = setup
    with pytest.raises(MechmedError, match="ensemble_k"):
        iv.Ensemble(k=1)
    with pytest.raises(MechmedError, match="clamp_to"):
        iv.Clamp({}, {}, "median")
    with pytest.raises(MechmedError, match="no SAE for layer 1"):
        iv.Clamp({}, {1: [0]})
    with pytest.raises(MechmedError, match="features.csv"):
        iv.top_features(tmp_path, [1], 4)
    (tmp_path / "features.csv").write_text("layer,rank,feature,mean_abs_attr\n0,0,5,0.9\n1,0,3,0.2\n1,1,9,0.5\n")
    assert iv.top_features(tmp_path, [1], 4) == {1: [9, 3]}
    assert iv.top_features(tmp_path, [0, 1], 2) == {0: [5], 1: [9]}
    with pytest.raises(MechmedError, match="ranks no feature in layers"):
        iv.top_features(tmp_path, [3], 4)
    with pytest.raises(MechmedError, match="meaning-preserving"):
        iv.fit_steering(bundle, [p for p in pairs if p.negated] or [], 1)


def test_ensemble_counterfactual_control_keeps_each_question_with_its_own_rewordings(setup):
    """The counterfactual control runs only the questions that have a counterfactual; an edit that reads
    each question's rewordings (the ensemble) is handed those questions' own keys, in order. A question no
    image answers the other way (asked of one image only) leaves every other question's reliance as it was."""
    bundle, pairs = setup
    lone = dataclasses.replace(pairs[0], id="lone", question="Is there a nodule?", paraphrase="Any nodule?",
                               question_id="lone")
    calls = []

    class Seen(iv.Ensemble):
        def margins(self, bundle, texts, images, *, role, rows, **kw):
            calls.append((role, list(texts), list(rows), images is not None and len(images)))
            return super().margins(bundle, texts, images, role=role, rows=rows, **kw)

    full = evaluate(bundle, pairs, edit=iv.Ensemble(k=3), controls=("counterfactual",), n_bootstrap=20)
    part = evaluate(bundle, [lone, *pairs], edit=Seen(k=3), controls=("counterfactual",), n_bootstrap=20)
    questions = [c for c in calls if c[0] == "question"]
    assert questions and all(len(rows) == len(texts) == n and [r[1] for r in rows] == texts
                             for _, texts, rows, n in questions)
    # the counterfactual forward: the four effusion questions, without the nodule question
    assert any(len(rows) == 4 and lone.question not in {r[1] for r in rows} for _, _, rows, _ in questions)
    assert part.pairs[0]["image_reliant"] is None and part.metrics["n_counterfactual"] == full.metrics["n_counterfactual"]
    assert [r["image_reliant"] for r in part.pairs[1:]] == [r["image_reliant"] for r in full.pairs]
