"""Fidelity metrics (R² about the set mean, per prompt, L0, cosine, CE recovered, margin change, by
token type, massive dimensions), their agreement with sae-lens's explained variance, the
one-forward-per-batch streaming evaluation, the sae-check runner and its figure."""

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
            for t in ("text", "image"):  # the splice at one type's positions loses nothing either
                if t in r["by_token_type"]:
                    assert r["by_token_type"][t]["ce_recovered"] == pytest.approx(1.0, abs=1e-3), (name, t)
            assert r["by_token_type"]["special"]["ce_recovered"] is None  # not spliced apart
            md = r["massive_dims"]
            assert md["r2_without"] == pytest.approx(1.0, abs=1e-5)
            assert md["r2_standardised"] == pytest.approx(1.0, abs=1e-5)
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


def _ce_type_splits(vlm, ps, batch_size):
    """Per batch, how many of CE_TOKEN_TYPES hold some but not all evaluated positions (each costs
    two forwards per layer)."""
    from mechmed.fidelity import CE_TOKEN_TYPES, token_types
    from mechmed.saes import token_mask

    out = []
    for start in range(0, len(ps), batch_size):
        inputs = ps.inputs(vlm, start, start + batch_size)
        mask, types = token_mask(inputs, vlm.tokenizer), token_types(vlm, inputs)
        out.append(sum(0 < int((types[t] & mask).sum()) < int(mask.sum()) for t in CE_TOKEN_TYPES))
    return out


def test_one_forward_per_batch_whatever_the_layers(vlm, small_sets):
    from mechmed.fidelity import evaluate_saes

    # the tiny tokenizer turns unseen words into <unk>, a special token: every text batch splits
    # text from special (T = 1); image prompts split text from image (T = 2)
    assert _ce_type_splits(vlm, small_sets["medical"], 4) == [1, 1, 1]
    assert _ce_type_splits(vlm, small_sets["images"], 4) == [2, 2]
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
        assert ev.n_forwards == len(calls) == 3 * (1 + 2 * (2 + 2 * 1))  # 1 + L·(2 + 2T)
        calls.clear()
        ev = evaluate_saes(vlm, {0: noisy_sae(0, 0)}, small_sets["images"], batch_size=4, ce=True)
        assert ev.n_forwards == len(calls) == 2 * (1 + 2 + 2 * 2 + 1)  # + the answer-position splice
    finally:
        handle.remove()


def test_rows_have_every_field(vlm, small_sets):
    from mechmed.fidelity import evaluate_saes

    ev = evaluate_saes(vlm, {0: noisy_sae(0, 3)}, small_sets["images"], batch_size=3, ce=True)
    r = ev.rows[0]
    for key in ("layer", "text_set", "r2", "r2_ci", "r2_pooled", "fvu", "fvu_pooled", "l0", "cosine",
                "ce_recovered", "margin_change", "p_value", "exceeds_threshold", "n_prompts", "n_tokens",
                "by_token_type", "massive_dims", "r2_definitions"):
        assert key in r, key
    assert {"r2", "r2_pooled"} <= set(r["r2_definitions"])
    assert set(r["massive_dims"]) == {"k", "dims", "shares", "variance_share", "r2_without", "r2_standardised"}
    assert r["massive_dims"]["k"] == 5 and len(r["massive_dims"]["dims"]) == 5
    for t in ("text", "image", "special", "bos"):
        assert {"r2_pooled", "fvu_pooled", "l0", "ce_recovered"} <= set(r["by_token_type"][t]), t
    json.dumps(r)  # the row is plain JSON
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


# ----------------------------------------------------------------------------- by hand on a tiny model


def _capture(bundle, ps, layer, batch_size):
    """Per batch of ``evaluate_saes``: (inputs, resid_post [b, T, d] of ``layer``, clean logits)."""
    from mechmed.capture import hooks

    out = []
    for start in range(0, len(ps), batch_size):
        inputs = ps.inputs(bundle, start, start + batch_size)
        got = {}

        def keep(site, act, store=got):
            store["a"] = act

        with torch.no_grad(), hooks(bundle.model, bundle.family, {Site(layer): keep}):
            logits = bundle.model(**inputs, use_cache=False).logits
        out.append((inputs, got["a"], logits))
    return out


def _evaluated(bundle, batches, sae):
    """The evaluated tokens over ``batches``: x, x̂ (float64 [tokens, d]) and each token's prompt."""
    from mechmed.saes import token_mask

    xs, xhs, prompt, start = [], [], [], 0
    for inputs, act, _ in batches:
        mask = token_mask(inputs, bundle.tokenizer)
        x = act[mask]
        with torch.no_grad():
            xh = sae.decode(sae.encode(x))
        xs.append(x.double())
        xhs.append(xh.double())
        prompt.append(torch.arange(mask.shape[0])[:, None].expand_as(mask)[mask] + start)
        start += mask.shape[0]
    return torch.cat(xs).numpy(), torch.cat(xhs).numpy(), torch.cat(prompt).numpy()


def _massive_by_hand(X, XH, k):
    """massive_dims from the formulas, over the tokens' activations X and reconstructions XH."""
    n = X.shape[0]
    V = ((X - X.mean(0)) ** 2).sum(0)  # Σ_t (x_d − μ_d)²
    E = ((X - XH) ** 2).sum(0)  # Σ_t (x_d − x̂_d)²
    top = np.argsort(-V)[:k]
    rest = np.setdiff1d(np.arange(X.shape[1]), top)
    sigma2 = V / n  # each dimension's variance over the evaluated tokens
    std_err = (((X - XH) ** 2) / sigma2).sum()  # Σ_d Σ_t (x − x̂)²/σ_d²
    std_tot = (((X - X.mean(0)) ** 2) / sigma2).sum()  # Σ_d Σ_t (x − μ)²/σ_d²
    return {"dims": top.tolist(), "shares": (V[top] / V.sum()).tolist(), "variance_share": V[top].sum() / V.sum(),
            "r2_without": 1 - E[rest].sum() / V[rest].sum(), "r2_standardised": 1 - std_err / std_tot,
            "r2_pooled": 1 - E.sum() / V.sum()}


@pytest.fixture(scope="module")
def noisy_on_images(vlm, small_sets):
    """A noisy SAE on layer 1 over the image prompts (text, image and special tokens), ce=True:
    the row, the SAE, and the captured batches."""
    from mechmed.fidelity import evaluate_saes

    ps = small_sets["images"]
    sae = noisy_sae(1, 11)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the function-scoped one_thread does (module fixtures set up before it)
    try:
        row = evaluate_saes(vlm, {1: sae}, ps, batch_size=3, ce=True, top_dims=4).rows[0]
        return row, sae, _capture(vlm, ps, 1, 3)
    finally:
        torch.set_num_threads(before)


def test_pooled_and_prompt_mean_r2_on_the_evaluated_tokens_agree_with_sae_lens(vlm, noisy_on_images):
    """r2_pooled over the evaluated tokens of a tiny VLM's image prompts is sae-lens's
    ExplainedVarianceCalculator fed the same tokens batch by batch (tolerance 1e-6: sae-lens squares in
    float32, mechmed in float64); r2 is the mean over prompts of R²ᵢ against the global mean, by hand."""
    from sae_lens.evals import ExplainedVarianceCalculator

    from mechmed.fidelity import R2_DEFINITIONS
    from mechmed.saes import token_mask

    row, sae, batches = noisy_on_images
    calc = ExplainedVarianceCalculator()
    for inputs, act, _ in batches:
        x = act[token_mask(inputs, vlm.tokenizer)]
        with torch.no_grad():
            calc.add_batch(sae_output=sae.decode(sae.encode(x)), hidden_acts=x)
    assert calc.num_samples == row["n_tokens"]
    assert row["r2_pooled"] == pytest.approx(calc.compute(), abs=1e-6)
    assert row["fvu_pooled"] == pytest.approx(1 - calc.compute(), abs=1e-6)

    X, XH, prompt = _evaluated(vlm, batches, sae)
    mu = X.mean(0)
    per_prompt = [1 - ((X[prompt == i] - XH[prompt == i]) ** 2).sum() / ((X[prompt == i] - mu) ** 2).sum()
                  for i in range(prompt.max() + 1)]
    assert row["r2"] == pytest.approx(float(np.mean(per_prompt)), rel=1e-6)
    assert abs(row["r2"] - row["r2_pooled"]) > 1e-4  # two different numbers, both reported
    assert row["r2_definitions"] == R2_DEFINITIONS


def test_massive_dims_by_hand(vlm, noisy_on_images):
    """Variance share of the top-k dimensions, their indices, R² without them and R² standardised
    per dimension, each from the formulas over the captured activations (tolerance rel 1e-6)."""
    row, sae, batches = noisy_on_images
    X, XH, _ = _evaluated(vlm, batches, sae)
    want = _massive_by_hand(X, XH, 4)
    md = row["massive_dims"]
    assert md["k"] == 4 and md["dims"] == want["dims"]
    np.testing.assert_allclose(md["shares"], want["shares"], rtol=1e-6)
    for key in ("variance_share", "r2_without", "r2_standardised"):
        assert md[key] == pytest.approx(want[key], rel=1e-6), key
    assert row["r2_pooled"] == pytest.approx(want["r2_pooled"], rel=1e-6)


def test_ce_recovered_by_token_type_by_hand(vlm, noisy_on_images):
    """CE recovered with x̂ (or zero) spliced in at the text or the image positions only, x elsewhere,
    scored on the headline's targets (a real token after an evaluated source, not an image token):
    forwards and cross-entropies by hand (tolerance 1e-5 on the losses, mechmed summing the float32 losses
    in float32, this test in float64; the ratio within what that tolerance allows)."""
    from mechmed.capture import hooks
    from mechmed.fidelity import token_types
    from mechmed.saes import token_mask

    row, sae, batches = noisy_on_images
    image_id = vlm.model.config.image_token_id
    sums = {k: 0.0 for k in ("clean", "text_recon", "text_zero", "image_recon", "image_zero")}
    count = 0
    for inputs, act, logits in batches:
        mask = token_mask(inputs, vlm.tokenizer)
        ids = inputs["input_ids"]
        valid = mask[:, :-1] & inputs["attention_mask"][:, 1:].bool() & (ids[:, 1:] != image_id)

        def ce(lg, valid=valid, ids=ids):
            lp = torch.nn.functional.cross_entropy(lg[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten(),
                                                   reduction="none").view(valid.shape)
            return float(lp[valid].double().sum())

        sums["clean"] += ce(logits)
        count += int(valid.sum())
        with torch.no_grad():
            recon = act.clone()
            recon[mask] = sae.decode(sae.encode(act[mask]))
        types = token_types(vlm, inputs)
        for t in ("text", "image"):
            at = (types[t] & mask)[..., None]
            assert at.any() and not at.all()
            for kind, new in (("recon", torch.where(at, recon, act)), ("zero", act.masked_fill(at, 0))):
                with torch.no_grad(), hooks(vlm.model, vlm.family, {Site(1): lambda s, a, v=new: v}):
                    sums[f"{t}_{kind}"] += ce(vlm.model(**inputs, use_cache=False).logits)
    clean = sums["clean"] / count
    assert row["ce_clean"] == pytest.approx(clean, abs=1e-5)
    for t in ("text", "image"):
        got = row["by_token_type"][t]
        r, z = sums[f"{t}_recon"] / count, sums[f"{t}_zero"] / count
        assert got["ce_recon"] == pytest.approx(r, abs=1e-5) and got["ce_zero"] == pytest.approx(z, abs=1e-5)
        # the ratio of the losses checked above, and by hand within what their tolerance allows:
        # |Δρ| ≤ δ (|∂ρ/∂z| + |∂ρ/∂r| + |∂ρ/∂c|) = δ (2 + 2|ρ|) / |z − c| with δ = 1e-5 (zeroing the few image
        # positions of layer 1 moves the loss little, so the ratio is ill-conditioned there)
        assert got["ce_recovered"] == pytest.approx(
            (got["ce_zero"] - got["ce_recon"]) / (got["ce_zero"] - row["ce_clean"]), rel=1e-12), t
        rho = (z - r) / (z - clean)
        assert got["ce_recovered"] == pytest.approx(rho, abs=1e-5 * (2 + 2 * abs(rho)) / abs(z - clean)), t
    assert row["by_token_type"]["special"]["ce_recovered"] is None and row["by_token_type"]["bos"]["ce_recovered"] is None


def test_ce_by_type_on_text_prompts(vlm, small_sets):
    """Text prompts have no image tokens (no image entry); with every evaluated token text, the text
    splice is the headline's and costs no forward."""
    from mechmed.fidelity import PromptSet, evaluate_saes

    ps = small_sets["medical"]
    known = PromptSet("known", ("chest radiograph", "a left pleural effusion"))  # words the tiny tokenizer knows
    for prompts, all_text in ((ps, False), (known, True)):
        ev = evaluate_saes(vlm, {1: noisy_sae(1, 2)}, prompts, batch_size=4, ce=True)
        r = ev.rows[0]
        assert "image" not in r["by_token_type"]
        if all_text:
            assert "special" not in r["by_token_type"]
            assert r["by_token_type"]["text"]["ce_recovered"] == r["ce_recovered"]
            assert ev.forwards_per_batch == 1 + 2
        else:
            assert r["by_token_type"]["text"]["ce_recovered"] != r["ce_recovered"]


def test_a_massive_dimension_carries_r2(vlm, small_sets):
    """Inject a dimension of huge variance (layer 1's post-feedforward norm scaled on dimension 0)
    and an SAE that reconstructs that dimension exactly and predicts the mean everywhere else: r2
    is high, but r2_without (dimension 0 left out) is 0 and r2_standardised is 1/d (one dimension of
    d explained), each by hand (tolerance 1e-4: the mean is decoded in float32)."""
    import copy

    from mechmed.fidelity import evaluate_saes
    from mechmed.models import ModelBundle

    model = copy.deepcopy(vlm.model)
    with torch.no_grad():
        model.model.language_model.layers[1].post_feedforward_layernorm.weight[0] += 100.0
    big = ModelBundle(model, vlm.processor, vlm.family, vlm.answers, "massive")
    ps = small_sets["medical"]
    batches = _capture(big, ps, 1, 4)
    ident = identity_sae(1)
    X, _, _ = _evaluated(big, batches, ident)
    b_dec = torch.tensor(X.mean(0), dtype=torch.float32)
    b_dec[0] = 0.0
    e0 = torch.zeros(D, 1)
    e0[0] = 1.0
    sae = _jumprelu(torch.cat([e0, -e0], 1), torch.cat([e0, -e0], 1).T.contiguous(), torch.zeros(2), b_dec,
                    torch.zeros(2), 1)  # x̂ = (x_0, μ_1, ..., μ_{d−1})
    row = evaluate_saes(big, {1: sae}, ps, batch_size=4, ce=False, top_dims=1).rows[0]
    _, XH, _ = _evaluated(big, batches, sae)
    want = _massive_by_hand(X, XH, 1)
    md = row["massive_dims"]
    assert md["dims"] == [0] and md["variance_share"] > 0.95
    assert row["r2_pooled"] == pytest.approx(want["r2_pooled"], abs=1e-4)
    assert row["r2"] > 0.9 and row["r2_pooled"] > 0.95
    assert md["r2_without"] == pytest.approx(want["r2_without"], abs=1e-4) and abs(md["r2_without"]) < 1e-4
    assert md["r2_standardised"] == pytest.approx(want["r2_standardised"], abs=1e-4)
    assert md["r2_standardised"] == pytest.approx(1 / D, abs=1e-4)


def test_massive_dims_stream_and_standardising_ignores_scale():
    """From the streaming sums: the same numbers however the tokens are batched; standardised R²
    does not change when each dimension is rescaled, pooled R² does; k = 0 leaves r2_pooled."""
    from mechmed.fidelity import massive_dims

    xs, idxs = _batches(seed=3)
    g = torch.Generator().manual_seed(9)
    xhs = [x + 0.4 * torch.randn(x.shape, generator=g) for x in xs]
    out = _stats(xs, xhs, idxs)
    X, XH = torch.cat(xs).double().numpy(), torch.cat(xhs).double().numpy()
    want = _massive_by_hand(X, XH, 5)
    got = massive_dims(out, 5)
    assert got["dims"] == want["dims"]
    for key in ("variance_share", "r2_without", "r2_standardised"):
        assert got[key] == pytest.approx(want[key], rel=1e-9), key
    one = massive_dims(_stats([torch.cat(xs)], [torch.cat(xhs)], [(torch.cat(
        [i + 3 * b for b, (i, _) in enumerate(idxs)]), 3 * len(idxs))]), 5)
    for key in ("variance_share", "r2_without", "r2_standardised"):
        assert one[key] == pytest.approx(got[key], rel=1e-9), key
    scale = torch.logspace(-2, 2, D)
    scaled = _stats([x * scale for x in xs], [xh * scale for xh in xhs], idxs)
    assert massive_dims(scaled, 5)["r2_standardised"] == pytest.approx(got["r2_standardised"], rel=1e-6)
    assert abs(scaled.r2_pooled - out.r2_pooled) > 0.01
    none = massive_dims(out, 0)
    assert none["dims"] == [] and none["variance_share"] == 0.0
    assert none["r2_without"] == pytest.approx(out.r2_pooled, rel=1e-12)
    with pytest.raises(MechmedError, match="top_dims -1"):
        from mechmed.fidelity import PromptSet, evaluate_saes

        evaluate_saes(None, {}, PromptSet("x", ("a",)), top_dims=-1)


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
    # 3 layers, each 2 splices + 2 for the text-only splice (the tiny tokenizer's <unk> are special tokens)
    assert data["cost"]["medical"]["forwards_per_batch"] == 1 + 3 * (2 + 2)
    assert "massive_dims" in by["medical", 1] and "R2 pool" in res.table() and "R2 stdz" in res.table()
    assert "without the top-5 variance dimensions" in (root / "out" / "r2_by_layer.html").read_text()
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
    monkeypatch.delenv(figures._WARNED_ENV, raising=False)
    with caplog.at_level(logging.WARNING, logger="mechmed.figures"):
        out = figures.save_figure(fig, tmp_path / "a")
        again = figures.save_figure(fig, tmp_path / "b")
    assert out["png"] is None and "Chromium" in out["png_skipped"] and again["png"] is None
    # one warning for the run, naming the fix; the figure kept for `mechmed report --figures`
    assert [r.getMessage() for r in caplog.records] == [figures.NO_BROWSER] and "plotly_get_chrome" in caplog.text
    assert (tmp_path / "a.html").read_text().count("<script") >= 1 and not (tmp_path / "a.png").exists()
    import plotly.io as pio

    assert pio.read_json(str(tmp_path / f"a{figures.FIGURE_JSON}")) == fig


def _detail_rows(with_image=True):
    rows = []
    for s, n in (("medical", 70), ("images", 100)):
        for L in range(3):
            by = {"text": {"r2_pooled": 0.96 - 0.01 * L}, "special": {"r2_pooled": 0.9 - 0.02 * L},
                  "bos": {"r2_pooled": None}}
            if s == "images" and with_image:
                by["image"] = {"r2_pooled": 0.93 - 0.015 * L}
            rows.append({"layer": L, "text_set": s, "r2": 0.97 - 0.01 * L, "r2_ci": [0.96 - 0.01 * L, 0.98 - 0.01 * L],
                         "r2_pooled": 0.965 - 0.01 * L, "n_prompts": n, "exceeds_threshold": L < 2, "by_token_type": by,
                         "massive_dims": {"k": 5, "r2_without": 0.8 - 0.05 * L, "r2_standardised": 0.7 - 0.04 * L}})
    return rows


def test_r2_by_layer_detail_figure():
    """``detail``: a panel per text set; beside each set's line, a marker per layer for the pooled R²
    over text / image / special tokens, without the top-k dimensions and standardised, each the
    row's number; the title names every series drawn and none that is not."""
    from mechmed.figures import r2_by_layer

    rows = _detail_rows()
    fig = r2_by_layer(rows, 0.95, detail=True)
    assert [a.text for a in fig.layout.annotations][:2] == ["medical text (n=70)", "image + question (n=100)"]
    shown = sorted((t for t in fig.data if t.showlegend is not False), key=lambda t: t.legendrank)
    assert [t.name for t in shown] == ["medical text (n=70)", "image + question (n=100)", "text tokens", "image tokens",
                                       "special tokens", "without the top-5 dims", "dims standardised"]
    getters = {"text tokens": lambda r: r["by_token_type"]["text"]["r2_pooled"],
               "image tokens": lambda r: r["by_token_type"]["image"]["r2_pooled"],
               "special tokens": lambda r: r["by_token_type"]["special"]["r2_pooled"],
               "without the top-5 dims": lambda r: r["massive_dims"]["r2_without"],
               "dims standardised": lambda r: r["massive_dims"]["r2_standardised"]}
    for s, axis in (("medical", "x"), ("images", "x2")):
        mine = [r for r in rows if r["text_set"] == s]
        traces = {t.name: t for t in fig.data if t.xaxis == axis}
        line = next(t for t in traces.values() if t.mode == "lines+markers")
        assert list(line.y) == [r["r2"] for r in mine] and list(line.x) == [0, 1, 2]
        assert [c != "white" for c in line.marker.color] == [r["exceeds_threshold"] for r in mine]
        for name, get in getters.items():
            if s == "medical" and name == "image tokens":
                assert name not in traces  # no image tokens in text prompts: nothing drawn
                continue
            assert list(traces[name].y) == pytest.approx([get(r) for r in mine]), (s, name)
    title = fig.layout.title.text
    for phrase in ("mean R² over prompts, 95% CI", "pooled R² over text / image / special tokens",
                   "without the top-5 variance dimensions", "divided by its std"):
        assert phrase in title
    assert fig.layout.yaxis.range[0] < 0.62 and 0.98 < fig.layout.yaxis.range[1] < 1.01
    assert sum(s.type == "line" and s.y0 == 0.95 for s in fig.layout.shapes) == 2  # the threshold in both panels

    plain = r2_by_layer(_detail_rows(with_image=False), 0.95, detail=True)
    assert "text / special tokens" in plain.layout.title.text and "image" not in plain.layout.title.text.split(
        "<br>")[-1]
    old = [{k: v for k, v in r.items() if k not in ("by_token_type", "massive_dims")} for r in rows]
    bare = r2_by_layer(old, 0.95, detail=True)  # rows of an older sae-check: the lines alone
    assert "markers" not in bare.layout.title.text and len(bare.data) == 2
