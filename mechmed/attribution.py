"""Attributing a paraphrase flip to layers and SAE features.

For a pair (question q, paraphrase p, same image) with margins m_q and m_p at the answer position
(the last token), and x_L the residual stream after layer L at that position:

- **Attribution patching** (layer L): a_L = ∇_{x_L} m_p · (x_L^q − x_L^p), the first-order
  estimate of how much m_p moves when q's residual is patched into p's run at layer L. All layers
  come from one batched forward over both phrasings and one backward (≈ 3 forward equivalents per
  pair, whatever the depth).
- **Exact activation patching** (layer L): run p with x_L^p replaced by x_L^q at the answer position:
  e_L = m_patched − m_p, recovery_L = e_L / (m_q − m_p). One forward per layer: the ground truth
  attribution approximates.
- **Features** (SAE at layer L, f = encode(x), Δf = f_p − f_q): feature attribution
  a_{L,i} = −Δf_i · (∇_{x_L} m_p · W_dec[i]) (moving feature i from p's value to q's, with the SAE
  error term kept, so the model itself is unchanged); **delta patching** x_p − Δf_i · W_dec[i] with
  recovery (m_patched − m_p) / (m_q − m_p); **clamping** x − f_i · W_dec[i] over a set of prompts.

Pairs whose paraphrase is negated are skipped: patching q into p cannot "recover" an answer that
is meant to be opposite.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np

from mechmed.capture import hooks
from mechmed.errors import MechmedError
from mechmed.readout import pair_images
from mechmed.sites import Site


@dataclass
class PairAttribution:
    """Per pair: margins, and per layer the attribution estimate (and exact patch effect)."""

    id: str
    m_q: float
    m_p: float
    flipped: bool
    layer_attr: np.ndarray
    """[L] attribution-patching estimate a_L of m_patched − m_p."""
    delta_norm: np.ndarray
    """[L] ‖x_L^q − x_L^p‖ at the answer position."""
    patch_effect: np.ndarray | None = None
    """[L] exact m_patched − m_p (when exact patching was run)."""
    features: dict = field(default_factory=dict)
    """layer -> {"f_q", "f_p", "attr"} dense arrays over the SAE's features (when SAEs are given)."""

    @property
    def gap(self) -> float:
        return self.m_q - self.m_p


@contextmanager
def _grad_from_embeddings(bundle):
    """Make the decoder's input embeddings a leaf that requires grad, so every later activation
    is in the autograd graph while all weights stay frozen."""
    module = bundle.family.get_module(bundle.model, bundle.family.embed_tokens)
    handle = module.register_forward_hook(lambda mod, args, out: out.detach().requires_grad_(True))
    try:
        yield
    finally:
        handle.remove()


def _inputs(bundle, questions, images):
    from mechmed.readout import build_inputs

    return build_inputs(bundle.processor, questions, images if bundle.multimodal else None).to(bundle.device)


def _margin(bundle, inputs, edit=None):
    import torch

    from mechmed.readout import answer_logits

    with torch.no_grad():
        if edit is None:
            s = answer_logits(bundle.model, inputs, bundle.answers)
        else:
            with hooks(bundle.model, bundle.family, edit):
                s = answer_logits(bundle.model, inputs, bundle.answers)
    return (s[:, 0] - s[:, 1]).cpu()


def attribute_batch(bundle, pairs: Sequence, *, saes: Mapping[int, object] | None = None,
                    exact: bool = False, image_cache: dict | None = None) -> list[PairAttribution]:
    """Attribute a batch of (non-negated) pairs: one forward over 2B prompts and one backward;
    with ``exact``, one more forward of the B paraphrases per layer."""
    import torch

    from mechmed.readout import answer_logits

    pairs = [p for p in pairs if not p.negated]
    if not pairs:
        return []
    image_cache = {} if image_cache is None else image_cache
    n_layers, B = bundle.n_layers, len(pairs)
    imgs = pair_images(pairs, image_cache)
    inputs = _inputs(bundle, [p.question for p in pairs] + [p.paraphrase for p in pairs],
                     None if imgs is None else imgs * 2)
    sites = [Site(layer) for layer in range(n_layers)]
    acts: dict[Site, torch.Tensor] = {}

    def keep(site, act):
        acts[site] = act

    with torch.enable_grad(), _grad_from_embeddings(bundle), hooks(bundle.model, bundle.family,
                                                                   dict.fromkeys(sites, keep)):
        scores = answer_logits(bundle.model, inputs, bundle.answers)
        margins = scores[:, 0] - scores[:, 1]
        grads = torch.autograd.grad(margins[B:].sum(), [acts[s] for s in sites])
    dt = margins.dtype  # float32, or float64 for a float64 model
    m = margins.detach().cpu().numpy()
    x_last = torch.stack([acts[s][:, -1].detach().to(dt) for s in sites])  # [L, 2B, d]
    g_p = torch.stack([g[B:, -1].to(dt) for g in grads])  # [L, B, d]
    dx = x_last[:, :B] - x_last[:, B:]  # q − p
    layer_attr = (g_p * dx).sum(-1).cpu().numpy()  # [L, B]
    delta_norm = dx.norm(dim=-1).cpu().numpy()

    results = []
    for j, p in enumerate(pairs):
        mq, mp = float(m[j]), float(m[B + j])
        results.append(PairAttribution(p.id, mq, mp, bool((mq > 0) != (mp > 0)), layer_attr[:, j].copy(),
                                       delta_norm[:, j].copy()))

    if saes:
        for layer, sae in saes.items():
            Site(layer).check(n_layers)
            W = sae.W_dec.detach()
            with torch.no_grad():
                f = sae.encode(x_last[layer].to(W.dtype)).to(dt)  # [2B, d_sae]
                gW = g_p[layer] @ W.to(dt).T  # [B, d_sae]
            f_q, f_p = f[:B], f[B:]
            attr = -(f_p - f_q) * gW
            for j, r in enumerate(results):
                r.features[layer] = {"f_q": f_q[j].cpu().numpy(), "f_p": f_p[j].cpu().numpy(),
                                     "attr": attr[j].cpu().numpy()}

    if exact:
        p_inputs = _inputs(bundle, [p.paraphrase for p in pairs], imgs)
        for layer in range(n_layers):
            src = x_last[layer, :B]

            def patch(site, act, src=src):
                act = act.clone()
                act[:, -1] = src.to(act.dtype)
                return act

            mp_patched = _margin(bundle, p_inputs, {Site(layer): patch}).numpy()
            for j, r in enumerate(results):
                if r.patch_effect is None:
                    r.patch_effect = np.zeros(n_layers)
                r.patch_effect[layer] = mp_patched[j] - r.m_p
    return results


def delta_patch(bundle, pair, layer: int, sae, features: Sequence[int], image_cache: dict | None = None) -> np.ndarray:
    """Recovery of each feature: run p with x_p − Δf_i·W_dec[i] at ``layer`` (answer position);
    returns (m_patched − m_p) / (m_q − m_p) per feature (one batched forward for all features)."""
    import torch

    image_cache = {} if image_cache is None else image_cache
    imgs = pair_images([pair], image_cache)
    both = _inputs(bundle, [pair.question, pair.paraphrase], None if imgs is None else imgs * 2)
    store = {}

    def keep(site, act):
        store["x"] = act[:, -1].detach()

    m_base = _margin(bundle, both, {Site(layer): keep}).numpy()
    x = store["x"]
    W = sae.W_dec.detach().to(x.dtype)
    with torch.no_grad():
        f = sae.encode(x.to(sae.W_dec.dtype)).to(x.dtype)
    df = f[1] - f[0]
    feats = list(features)
    k = len(feats)
    shifts = torch.stack([df[i] * W[i] for i in feats])  # [k, d]
    p_inputs = _inputs(bundle, [pair.paraphrase] * k, None if imgs is None else imgs * k)

    def patch(site, act):
        act = act.clone()
        act[:, -1] = act[:, -1] - shifts.to(act.dtype)
        return act

    mp = _margin(bundle, p_inputs, {Site(layer): patch}).numpy()
    gap = m_base[0] - m_base[1]
    return (mp - m_base[1]) / gap if abs(gap) > 1e-6 else np.full(k, np.nan)


def clamp_feature(bundle, pairs, layer: int, sae, feature: int, *, batch_size: int = 32) -> dict:
    """Flip rate over ``pairs`` with feature ``feature`` removed at ``layer`` at the answer position
    (x − f_i · W_dec[i], both phrasings) against without: does removing it remove flips?"""
    import torch

    from mechmed.consistency import evaluate

    W = sae.W_dec.detach()

    def remove(site, act):
        x = act[:, -1]
        f = sae.encode(x.to(W.dtype))[:, feature]
        act = act.clone()
        act[:, -1] = x - (f[:, None] * W[feature]).to(act.dtype)
        return act

    base = evaluate(bundle, pairs, batch_size=batch_size, controls=False, n_bootstrap=200).metrics
    with hooks(bundle.model, bundle.family, {Site(layer): remove}), torch.no_grad():
        clamped = evaluate(bundle, pairs, batch_size=batch_size, controls=False, n_bootstrap=200).metrics
    return {"layer": layer, "feature": feature, "flip_rate": base["flip_rate"],
            "flip_rate_clamped": clamped["flip_rate"], "n_flips": base["n_flips"],
            "n_flips_clamped": clamped["n_flips"], "n_pairs": base["n_pairs"]}


def attribute(bundle, pairs: Sequence, *, saes: Mapping[int, object] | None = None, exact: bool = False,
              batch_size: int = 8, progress: bool = False) -> list[PairAttribution]:
    """Attribute every non-negated pair (see :func:`attribute_batch`)."""
    from mechmed.progress import progress_bar

    usable = [p for p in pairs if not p.negated]
    if not usable:
        raise MechmedError("no pairs to attribute: the data has none, or only negated rewordings")
    cache: dict = {}
    out: list[PairAttribution] = []
    starts = range(0, len(usable), batch_size)
    for s in progress_bar(starts, desc="attributing" if progress else None, total=len(starts)):
        out.extend(attribute_batch(bundle, usable[s:s + batch_size], saes=saes, exact=exact, image_cache=cache))
    return out


# ---------------------------------------------------------------- layer scores

SCORE_KEYS = ("gain_flipped", "gain_all", "attr_flipped", "attr_stable", "attr_all", "patch_flipped",
              "recovery_flipped", "feature_auc")


def layer_scores(results: Sequence[PairAttribution], *, n_bootstrap: int = 1000, seed: int = 0) -> dict:
    """Aggregate per-pair attributions into per-layer scores with bootstrap 95% intervals.

    - ``attr_flipped`` / ``attr_stable`` / ``attr_all``: mean |a_L| over flipped / stable / all pairs;
    - ``gain_flipped`` / ``gain_all``: mean |a_L| − |a_{L−1}| (|a_{−1}| = 0): how much of the flip
      *enters* at layer L. The residual at the answer position accumulates what earlier layers wrote,
      so |a_L| grows with depth and a window on it always ends at the last layer; the gain peaks
      where the flip is computed (the default score of ``select-layers``);
    - ``patch_flipped``: mean |e_L| (exact patching) over flipped pairs;
    - ``recovery_flipped``: mean e_L / (m_q − m_p) over flipped pairs;
    - ``feature_auc``: per layer with an SAE, the feature with the largest mean |Δf| on flipped
      pairs, and the AUC of its |Δf| for telling flipped from stable pairs;
    - ``spearman_attr_patch``: rank agreement across layers of attribution and exact patching (both grow
      with depth, so it is high whatever the layers do);
    - ``spearman_gain_patch``: rank agreement of ``gain_flipped`` with exact patching's gain (mean |e_L| minus
      mean |e_{L−1}|): the check of the selection's score; ``spearman_index_patch``: layer index alone
      against the same, the null it should beat.
    """
    from scipy.stats import spearmanr

    from mechmed import stats

    if not results:
        raise MechmedError("no attributed pairs to score")
    flipped = np.array([r.flipped for r in results])
    A = np.abs(np.stack([r.layer_attr for r in results]))  # [n, L]
    n_layers = A.shape[1]

    def agg(M, mask):
        if mask.sum() == 0:
            return {"mean": [None] * n_layers, "ci": [[None, None]] * n_layers, "n": 0}
        means, cis = [], []
        for layer in range(n_layers):
            x = M[mask, layer]
            x = x[np.isfinite(x)]
            if x.size == 0:
                means.append(None)
                cis.append([None, None])
                continue
            b = stats.bootstrap_ci(x, n_resamples=n_bootstrap, seed=seed) if x.size > 1 else None
            means.append(float(x.mean()))
            cis.append([b.low, b.high] if b else [float(x[0]), float(x[0])])
        return {"mean": means, "ci": cis, "n": int(mask.sum())}

    G = np.diff(A, axis=1, prepend=0.0)
    out = {"n_layers": n_layers, "n_pairs": len(results), "n_flipped": int(flipped.sum()),
           "scores": {"gain_flipped": agg(G, flipped), "gain_all": agg(G, np.ones_like(flipped)),
                      "attr_flipped": agg(A, flipped), "attr_stable": agg(A, ~flipped),
                      "attr_all": agg(A, np.ones_like(flipped))}}
    if all(r.patch_effect is not None for r in results):
        E = np.stack([r.patch_effect for r in results])
        gaps = np.array([r.gap for r in results])[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            R = np.where(np.abs(gaps) > 1e-6, E / gaps, np.nan)
        out["scores"]["patch_flipped"] = agg(np.abs(E), flipped)
        out["scores"]["recovery_flipped"] = agg(R, flipped)
        a, e = out["scores"]["attr_flipped"]["mean"], out["scores"]["patch_flipped"]["mean"]
        g = out["scores"]["gain_flipped"]["mean"]
        if None not in a and None not in e and n_layers > 2:
            out["spearman_attr_patch"] = float(spearmanr(a, e).statistic)
            # |a_L| and |e_L| both grow with depth, so they agree whatever the layers do; the check that can
            # fail compares what enters at each layer, with layer index alone as the null
            patch_gain = np.diff(np.asarray(e, dtype=float), prepend=0.0)
            out["spearman_gain_patch"] = float(spearmanr(g, patch_gain).statistic)
            out["spearman_index_patch"] = float(spearmanr(np.arange(n_layers), patch_gain).statistic)
    feature_layers = sorted(set().union(*[r.features.keys() for r in results]))
    if feature_layers:
        auc = [None] * n_layers
        top = {}
        for layer in feature_layers:
            D = np.abs(np.stack([r.features[layer]["f_p"] - r.features[layer]["f_q"] for r in results]))
            ref = D[flipped] if flipped.any() else D
            i = int(np.argmax(ref.mean(0)))
            top[layer] = i
            if 0 < flipped.sum() < len(flipped):
                auc[layer] = stats.auc(D[:, i], flipped)
        out["scores"]["feature_auc"] = {"mean": auc, "ci": [[None, None]] * n_layers, "n": len(results)}
        out["top_feature"] = {str(k): v for k, v in top.items()}
    return out


def feature_table(results: Sequence[PairAttribution], *, top: int = 10) -> list[dict]:
    """Top features per layer by mean |attribution| over flipped pairs (all pairs if none flipped)."""
    from mechmed import stats

    flipped = np.array([r.flipped for r in results])
    mask = flipped if flipped.any() else np.ones_like(flipped)
    rows = []
    layers = sorted(set().union(*[r.features.keys() for r in results])) if results else []
    for layer in layers:
        F_q = np.stack([r.features[layer]["f_q"] for r in results])
        F_p = np.stack([r.features[layer]["f_p"] for r in results])
        AT = np.stack([r.features[layer]["attr"] for r in results])
        D = F_p - F_q
        order = np.argsort(-np.abs(AT[mask]).mean(0))[:top]
        for rank, i in enumerate(order):
            auc = stats.auc(np.abs(D[:, i]), flipped) if 0 < flipped.sum() < len(flipped) else None
            rows.append({"layer": layer, "rank": rank, "feature": int(i),
                         "mean_delta_f": float(D[mask, i].mean()), "mean_abs_delta_f": float(np.abs(D[mask, i]).mean()),
                         "mean_attr": float(AT[mask, i].mean()), "mean_abs_attr": float(np.abs(AT[mask, i]).mean()),
                         "active_frac_q": float((F_q[:, i] > 0).mean()), "active_frac_p": float((F_p[:, i] > 0).mean()),
                         "auc": auc})
    return rows
