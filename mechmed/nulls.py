"""Matched null controls for the training-free fixes that act at a named place.

A fix that clamps the attributed SAE features (``clamp``) or adds a fitted direction (``steer``)
reverses some flips. Would any features, or any direction, at the same layers do as much? The
null answers by drawing, with a seed, many edits of the same kind and size at the same place:

- ``clamp`` (to the original question's values): the same number of SAE features at each clamped
  layer, drawn among that layer's features that fire at the answer position on at least one
  evaluated question (a feature that never fires would clamp nothing), the arm's own left out, and
  set to their value on the pair's original question, exactly as the arm sets its own;
- ``steer``: a direction drawn uniformly on the sphere, scaled to the fitted vector's norm, added at
  the same layer and position to the same prompts.

Each draw is scored as the arm is, over the headline pairs: base flips it reverses, new flips it
makes, and the net. The arm's standing is its count against the draws: their mean, their best
(a best-of-N null, as FlipLens uses), and a one-sided permutation p = (1 + #{draws ≥ arm}) / (1 + N).

Both fixes change the activations at the answer position (the last token) only, so the prompt
without its last token runs once and its keys and values are kept; each edit then runs the last
token alone (:func:`margins_under_edits`). That makes hundreds of draws affordable; the arm's own
edit is scored through the same path, and its margins agree with the full forward's
(``max_abs_diff_full`` in the result).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import numpy as np

from mechmed.capture import hooks
from mechmed.errors import MechmedError
from mechmed.interventions import Clamp, Steering, _edited, _last_position_edit, answer_residuals
from mechmed.sites import Site

#: Draws of each null when the ablation config does not say.
DEFAULT_DRAWS = 100
#: What each null draws, for results and the report.
NULL_TEXT = {"clamp": "random SAE features that fire on the questions, at the same layers and as many, set to the "
                      "original's values",
             "clamp_scaled": "the same random features, their change rescaled at each prompt and layer to the clamp's",
             "steer": "random directions of the steering vector's norm"}
#: Prompt-sequence inputs that lose their last token in the prefix run (others, e.g. pixels, stay whole).
_SEQUENCE_KEYS = ("input_ids", "attention_mask", "token_type_ids", "mm_token_type_ids")


def margins_under_edits(bundle, texts: Sequence[str], images: Sequence | None, n_edits: int, edit_fns, *,
                        batch_size: int = 16, edits_per_step: int = 64,
                        cache_budget: float = 2 * 2**30) -> np.ndarray:
    """Margins of every prompt under each of ``n_edits`` edits ([n_edits, n_prompts] float32).

    ``edit_fns`` is {Site: fn(x, prompts, edits)}: ``x`` the [rows, d] activations at the last
    position, ``prompts`` and ``edits`` each row's prompt index (into ``texts``) and edit index; it
    returns the edited rows. The edits may change the last position only: the prompt without its
    last token runs once per batch (its keys and values cached), then the last token runs once per
    ``edits_per_step`` edits, the cache repeated for them (fewer, so that the repeated cache stays under
    ``cache_budget`` bytes: a 4B model's cache is large)."""
    import torch

    from mechmed.readout import build_inputs, yes_no_logits

    texts = list(texts)
    out = np.zeros((n_edits, len(texts)), np.float32)
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            stop = min(start + batch_size, len(texts))
            inputs = build_inputs(bundle.processor, texts[start:stop],
                                  None if images is None else list(images[start:stop])).to(bundle.device)
            prefix = {k: (v[:, :-1] if k in _SEQUENCE_KEYS else v) for k, v in inputs.items()}
            first_out = bundle.model(**prefix, use_cache=True, logits_to_keep=1)
            cache = getattr(first_out, "cache", None) or first_out.past_key_values
            per_step = _edits_per_step(cache, edits_per_step, cache_budget)
            for first in range(0, n_edits, per_step):
                d = min(per_step, n_edits - first)
                step = copy.deepcopy(cache)
                step.batch_repeat_interleave(d)
                last = {k: v[:, -1:].repeat_interleave(d, 0) for k, v in inputs.items()
                        if k in _SEQUENCE_KEYS and k != "attention_mask"}
                last["attention_mask"] = inputs["attention_mask"].repeat_interleave(d, 0)
                prompts = torch.arange(start, stop).repeat_interleave(d)
                edits = torch.arange(first, first + d).repeat(stop - start)

                with hooks(bundle.model, bundle.family, {site: _bound(fn, prompts, edits)
                                                         for site, fn in edit_fns.items()}):
                    logits = bundle.model(**last, **{_cache_arg(bundle.model): step}, use_cache=True,
                                          logits_to_keep=1).logits
                s = yes_no_logits(logits[:, -1], bundle.answers)
                out[first:first + d, start:stop] = (s[:, 0] - s[:, 1]).float().cpu().numpy().reshape(stop - start, d).T
    if not np.isfinite(out).all():
        raise MechmedError(f"--model {bundle.name}: a margin under an edit is not finite; check the weights and --dtype")
    return out


def _edits_per_step(cache, most: int, budget: float) -> int:
    """How many edits one step can run: at most ``most``, and the repeated cache under ``budget`` bytes."""
    size = sum(t.numel() * t.element_size() for layer in getattr(cache, "layers", ()) for t in
               (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None and hasattr(t, "numel"))
    return max(1, min(most, int(budget // size))) if size else most


def _cache_arg(model) -> str:
    """The forward's keyword for a key/value cache: ``cache`` in newer transformers, else ``past_key_values``."""
    import inspect

    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _bound(fn, prompts, edits):
    """A :func:`mechmed.capture.hooks` function at the last position that calls ``fn(site, x, prompts, edits)``."""
    return _last_position_edit(lambda site, x: fn(site, x, prompts, edits))


def _clamp_bank(clamp: Clamp, bundle, pairs, images, draws: int, rng, batch_size: int):
    """Edit 0 none, 1 the arm's clamp, 2.. the null draws; with ``scaled`` also, after those, each draw
    with its change rescaled at every prompt and layer to the arm's there. Returns (edit fns, the
    number of edits, the drawn feature sets, the mean change norm of each edit)."""
    import torch

    if clamp.to != "original":
        raise MechmedError("null controls: clamp_to zero edits the questions too; the null is defined for "
                           "clamp_to: original")
    layers = sorted(clamp.features)
    h = answer_residuals(bundle, [p.question for p in pairs], images, layers, batch_size=batch_size)
    f_q, feats = {}, {}
    for layer in layers:
        sae = clamp.saes[layer]
        with torch.no_grad():
            f_q[layer] = sae.encode(h[layer].to(sae.W_dec.device, sae.W_dec.dtype)).cpu()
        own = set(clamp.features[layer])
        pool = [i for i in torch.nonzero((f_q[layer] != 0).any(0)).flatten().tolist() if i not in own]
        k = len(clamp.features[layer])
        if len(pool) < k:
            raise MechmedError(f"null controls: layer {layer} has {len(pool)} other features that fire on the "
                               f"questions; the clamp uses {k}")
        drawn = [sorted(rng.choice(pool, k, replace=False).tolist()) for _ in range(draws)]
        feats[layer] = torch.tensor([sorted(own)] * 2 + drawn * 2)  # none, arm, draws, draws scaled
    n_edits = 2 + 2 * draws
    keep = _edited(pairs)
    norm_sum = torch.zeros(n_edits, dtype=torch.float64)
    arm_norm = {layer: torch.zeros(len(pairs)) for layer in layers}  # the arm's change, per prompt

    def fn(site, x, prompts, edits):
        layer = site.layer
        sae = clamp.saes[layer]
        idx = feats[layer][edits]
        target = torch.gather(f_q[layer][prompts], 1, idx)
        active = keep[prompts] * (edits != 0)
        with torch.no_grad():
            xs = x.to(sae.W_dec.device, sae.W_dec.dtype)
            f = sae.encode(xs)
            delta = (sae.decode(f.scatter(1, idx.to(f.device), target.to(f.device, f.dtype))) - sae.decode(f)).cpu()
        delta = delta * active[:, None]
        norm = delta.norm(dim=-1)
        is_arm = edits == 1
        arm_norm[layer][prompts[is_arm]] = norm[is_arm]
        scaled = edits >= 2 + draws
        if scaled.any():  # the arm's rows come first (edit 1, the first step of every batch)
            ratio = torch.where(norm > 0, arm_norm[layer][prompts] / norm.clamp_min(1e-30), torch.zeros_like(norm))
            delta = torch.where(scaled[:, None], delta * ratio[:, None], delta)
            norm = torch.where(scaled, norm * ratio, norm)
        norm_sum.index_add_(0, edits, norm.double())
        return x + delta.to(x.device, x.dtype)

    n_edited = max(1, int(keep.sum()))
    sets = [{str(layer): feats[layer][2 + j].tolist() for layer in layers} for j in range(draws)]
    return {Site(layer): fn for layer in layers}, n_edits, sets, lambda: (norm_sum / n_edited).tolist()


def _steer_bank(steer: Steering, pairs, draws: int, rng):
    """Edit 0 none, 1 the arm's steering vector, 2.. random directions of its norm."""
    import torch

    v = steer.scale * steer.vector.float()
    g = torch.from_numpy(rng.standard_normal((draws, v.numel()))).float()
    bank = torch.cat([torch.zeros(1, v.numel()), v[None], g / g.norm(dim=1, keepdim=True) * v.norm()])
    keep = _edited(pairs)

    def fn(site, x, prompts, edits):
        return x + (keep[prompts, None] * bank[edits]).to(x.device, x.dtype)

    norms = bank.norm(dim=1).tolist()
    return {Site(steer.layer): fn}, len(bank), lambda: norms


def null_stats(reversed_: int, new: int, draws_reversed, draws_new) -> dict:
    """The arm's reversals, new flips and net (reversals − new flips) against the draws of its null:
    each as {arm, mean, sd, best, p}, p = (1 + #{draws ≥ arm}) / (1 + N), one-sided (for new flips, the
    draws as many or more: a small p says the arm made more new flips than the null)."""
    r, n = np.asarray(draws_reversed, float), np.asarray(draws_new, float)

    def stat(arm, x):
        return {"arm": int(arm), "mean": float(x.mean()), "sd": float(x.std(ddof=1)) if len(x) > 1 else 0.0,
                "best": int(x.max()), "p": float((1 + (x >= arm).sum()) / (1 + len(x)))}

    return {"reversed": stat(reversed_, r), "new_flips": stat(new, n), "net": stat(reversed_ - new, r - n)}


def pool_nulls(results: Sequence[dict], shared: bool = False) -> dict | None:
    """Null results of several seeds as one. Seeds with their own model and pairs (the demo's): the
    arm's counts summed, and draw j of the pooled null the sum of every seed's draw j (independent draws
    of independent seeds). Seeds on the same model and pairs (``shared``), where the arm's edit and its
    counts are the same in each: the first seed's counts against every seed's draws as one null of
    N·K draws (summing would count the pairs once per seed). None if a seed has none or their draw
    counts differ."""
    if not results or any(r is None for r in results) or len({r["draws"] for r in results}) > 1:
        return None
    skipped = next((r for r in results if r.get("skipped")), None)
    if len(results) == 1 or skipped:
        return skipped or results[0]
    if shared:
        def joined(parts: list[dict]) -> dict:
            dr = [x for r in parts for x in r["draws_reversed"]]
            dn = [x for r in parts for x in r["draws_new_flips"]]
            return {**null_stats(parts[0]["reversed"]["arm"], parts[0]["new_flips"]["arm"], dr, dn),
                    "null": parts[0]["null"], "draws_reversed": dr, "draws_new_flips": dn,
                    "edit_norm": {"arm": parts[0]["edit_norm"]["arm"],
                                  "null_mean": float(np.mean([r["edit_norm"]["null_mean"] for r in parts]))}}

        out = {"arm": results[0]["arm"], "draws": results[0]["draws"] * len(results),
               "seeds": [r["seed"] for r in results], "unit": "pair", "n_pairs": results[0]["n_pairs"],
               "n_base_flips": results[0]["n_base_flips"], **joined(list(results))}
        if all(r.get("scaled") for r in results):
            out["scaled"] = joined([r["scaled"] for r in results])
        return out

    def summed(parts: list[dict]) -> dict:
        dr = np.sum([r["draws_reversed"] for r in parts], axis=0)
        dn = np.sum([r["draws_new_flips"] for r in parts], axis=0)
        return {**null_stats(sum(r["reversed"]["arm"] for r in parts), sum(r["new_flips"]["arm"] for r in parts),
                             dr, dn), "null": parts[0]["null"], "draws_reversed": dr.tolist(),
                "draws_new_flips": dn.tolist(),
                "edit_norm": {k: float(np.mean([r["edit_norm"][k] for r in parts])) for k in ("arm", "null_mean")}}

    out = {"arm": results[0]["arm"], "draws": results[0]["draws"], "seeds": [r["seed"] for r in results],
           "n_pairs": sum(r["n_pairs"] for r in results), "n_base_flips": sum(r["n_base_flips"] for r in results),
           **summed(results)}
    if all(r.get("scaled") for r in results):
        out["scaled"] = summed([r["scaled"] for r in results])
    return out


def null_control(bundle, edit, pairs: Sequence, *, draws: int = DEFAULT_DRAWS, seed: int = 0,
                 batch_size: int = 16, check_full: bool = True, reference: dict | None = None) -> dict:
    """The arm's reversals and new flips over the headline pairs of ``pairs`` against ``draws`` matched
    random edits (module doc). The largest margin difference of the cached path from the full forward
    (``max_abs_diff_full``) is taken against ``reference`` (pair id -> the paraphrase margin the arm's
    own evaluation gave) when given; else ``check_full`` runs the arm's edit and the plain model through
    the full forward for it."""
    from mechmed.readout import margins, pair_images

    if draws < 1:
        raise MechmedError(f"null controls: draws = {draws}; give at least 1 (e.g. {DEFAULT_DRAWS})")
    pairs = [p for p in pairs if not p.in_negation_set] or list(pairs)
    if not pairs:
        raise MechmedError("null controls: no pairs to score")
    images = pair_images(pairs) if bundle.multimodal else None
    rng = np.random.default_rng([seed, 2048])
    if isinstance(edit, Clamp):
        fns, n_edits, sets, norms = _clamp_bank(edit, bundle, pairs, images, draws, rng, batch_size)
        extra = {"features": sets}
    elif isinstance(edit, Steering):
        fns, n_edits, norms = _steer_bank(edit, pairs, draws, rng)
        extra = {}
    else:
        raise MechmedError(f"null controls: defined for clamp and steer, not {edit.name}")
    m_q = margins(bundle, [p.question for p in pairs], images, batch_size=batch_size).numpy()
    m_p = margins_under_edits(bundle, [p.paraphrase for p in pairs], images, n_edits, fns, batch_size=batch_size)
    negated = np.array([p.negated for p in pairs])
    flips = ((m_q[None] > 0) != (m_p > 0)) ^ negated[None]
    base = flips[0]
    reversed_ = (base[None] & ~flips).sum(1)
    new = (~base[None] & flips).sum(1)
    norm = norms()
    nulls = {"random": slice(2, 2 + draws)}
    if n_edits > 2 + draws:
        nulls["scaled"] = slice(2 + draws, None)

    def one(sl) -> dict:
        return {**null_stats(int(reversed_[1]), int(new[1]), reversed_[sl], new[sl]),
                "draws_reversed": reversed_[sl].tolist(), "draws_new_flips": new[sl].tolist(),
                "edit_norm": {"arm": norm[1], "null_mean": float(np.mean(norm[sl]))}}

    result = {"arm": edit.name, "draws": draws, "seed": seed, "n_pairs": len(pairs), "n_base_flips": int(base.sum()),
              "null": NULL_TEXT[edit.name], **one(nulls["random"]), **extra}
    if "scaled" in nulls:
        result["scaled"] = {"null": NULL_TEXT["clamp_scaled"], **one(nulls["scaled"])}
    if reference is not None:  # the arm's evaluation already ran the full forward
        full = np.array([reference[p.id] for p in pairs], np.float32)
        result["max_abs_diff_full"] = float(np.abs(full - m_p[1]).max())
    elif check_full:  # the cached path against the arm's own full forward, and the plain one
        full = edit.margins(bundle, [p.paraphrase for p in pairs], images, role="paraphrase", rows=pairs,
                            batch_size=batch_size).numpy()
        plain = margins(bundle, [p.paraphrase for p in pairs], images, batch_size=batch_size).numpy()
        result["max_abs_diff_full"] = float(max(np.abs(full - m_p[1]).max(), np.abs(plain - m_p[0]).max()))
    return result
