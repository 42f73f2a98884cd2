"""The selection audit: does the window select-layers picks sit where training helps?

An ablation with ``audit`` set trains, beside its arms, every contiguous window of the selected width,
random layer sets of that width (drawn with a seed, contiguous ones left out: every window is already
trained), all layers at the window's number of trainable parameters (rank scaled down) and all layers at
the window's rank, each with the selected arm's loss, data and steps. :func:`analyse` then compares what
each candidate achieved on the held-out pairs with what the attribution predicted for it:

- each candidate's flip-rate reduction and |Δmargin| reduction against the base model, with intervals
  from a bootstrap over questions (within each seed when seeds have their own data);
- for every score key of ``layer_scores.json``, and for layer index as a null predictor, the Spearman
  correlation between a layer set's predicted score (Σ of its layers' scores; for layer index, the mean
  index) and its achieved reduction over the same-size candidates, with a bootstrap interval;
- the selected window's rank among the windows and its regret (the best window's reduction minus its own);
- the share of random sets that did at least as well as the selected window;
- the window each selection criterion (:data:`CRITERIA`) would pick, and its regret.

Every interval comes from one set of question resamples shared by all candidates, so differences and
ranks are paired. The resamples hold the attribution fixed: they measure how sure the achieved
reductions are, not the scores.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from mechmed.errors import MechmedError

#: The audit's defaults (the ``audit`` key of an ablation config may override each).
AUDIT_DEFAULTS = {"random_sets": 8, "seed": 0, "n_bootstrap": 1000}
#: The trained arms whose loss is the selected arm's: candidates the audit can take from the grid itself.
SAME_LOSS_ARMS = ("selected", "early", "middle", "late", "all", "random")


@dataclass(frozen=True)
class Candidate:
    """One layer set the audit trains: its arm name in the grid, kind, layers and rank (None: the
    training config's)."""

    name: str
    kind: str
    """window, random, all_matched (all layers at the window's parameter count) or all (at its rank)."""
    layers: tuple
    rank: int | None = None


def check_audit(audit, source: str = "ablation config") -> dict | None:
    """The ``audit`` option with its defaults filled in (``true`` = every default; false/None = off)."""
    if audit is None or audit is False:
        return None
    if audit is True:
        audit = {}
    if not isinstance(audit, dict):
        raise MechmedError(f"{source}: audit must be true or a mapping of {', '.join(AUDIT_DEFAULTS)}")
    unknown = sorted(set(audit) - set(AUDIT_DEFAULTS))
    if unknown:
        raise MechmedError(f"{source}: audit: unknown key {unknown[0]!r}; known: {', '.join(AUDIT_DEFAULTS)}")
    out = {**AUDIT_DEFAULTS, **audit}
    for key in ("random_sets", "seed"):
        if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 0:
            raise MechmedError(f"{source}: audit: {key} must be a non-negative integer, got {out[key]!r}")
    if not isinstance(out["n_bootstrap"], int) or out["n_bootstrap"] < 100:
        raise MechmedError(f"{source}: audit: n_bootstrap must be an integer >= 100, got {out['n_bootstrap']!r}")
    return out


def matched_rank(rank: int, width: int, n_layers: int, n_experts: int | None = None) -> int:
    """The rank at which adapting all ``n_layers`` trains about as many parameters as ``width`` layers at
    ``rank`` (a multiple of ``n_experts`` for spectral experts)."""
    r = max(1, round(rank * width / n_layers))
    return max(n_experts, r - r % n_experts) if n_experts else r


def random_sets(n_layers: int, width: int, count: int, seed: int = 0) -> list[tuple]:
    """``count`` distinct non-contiguous sets of ``width`` layers, drawn uniformly with ``seed`` (fewer
    when fewer exist)."""
    n_total = math.comb(n_layers, width) - (n_layers - width + 1)
    count = min(count, n_total)
    rng = np.random.default_rng(seed)
    out: list[tuple] = []
    while len(out) < count:
        s = tuple(sorted(int(i) for i in rng.choice(n_layers, size=width, replace=False)))
        if s[-1] - s[0] != width - 1 and s not in out:
            out.append(s)
    return out


def candidates(n_layers: int, width: int, rank: int, *, random_sets_count: int = 8, seed: int = 0,
               n_experts: int | None = None) -> list[Candidate]:
    """Every layer set of the audit, windows first."""
    if not 1 <= width <= n_layers:
        raise MechmedError(f"audit: the selected width {width} must be between 1 and the model's {n_layers} layers")
    out = [Candidate(f"w{a}-{a + width - 1}", "window", tuple(range(a, a + width)))
           for a in range(n_layers - width + 1)]
    out += [Candidate(f"set{i}", "random", s) for i, s in enumerate(random_sets(n_layers, width, random_sets_count,
                                                                                  seed))]
    if width < n_layers:
        out.append(Candidate("all_matched", "all_matched", tuple(range(n_layers)),
                             matched_rank(rank, width, n_layers, n_experts)))
        out.append(Candidate("all_samerank", "all", tuple(range(n_layers))))
    return out


# ---------------------------------------------------------------- criteria


def _selected_by(key: str, strategy: str) -> Callable:
    """The window :func:`mechmed.selection.select` picks with ``strategy`` on score ``key``."""
    def pick(scores: dict, width: int) -> int | None:
        from mechmed.selection import select

        v = _score_means(scores, key)
        return None if v is None else select(v, strategy, width=width).layers[0]
    return pick


def _ending_at(layer: Callable) -> Callable:
    def pick(scores: dict, width: int) -> int | None:
        at = layer(scores)
        if at is None:
            return None
        from mechmed.selection import window_ending_at

        return window_ending_at(at, width, len(scores["scores"]["gain_flipped"]["mean"]))
    return pick


def _gain_half(scores: dict) -> int | None:
    v = _score_means(scores, "gain_flipped")
    if v is None:
        return None
    c = np.cumsum(np.clip(v, 0, None))
    return int(np.searchsorted(c, c[-1] / 2))


#: Window criteria the audit compares: name -> (description, pick(scores, width) -> window start or None).
CRITERIA: dict = {
    "gain_flipped": ("the window with the largest summed gain on flipped pairs (select-layers' default)",
                     _selected_by("gain_flipped", "window")),
    "gain_peak_end": ("the window ending at the layer of largest gain (select-layers --strategy peak_end)",
                      _selected_by("gain_flipped", "peak_end")),
    "gain_half_end": ("the window ending where half the flip's attribution has entered (the layers that "
                      "build it)", _ending_at(_gain_half)),
    "patch_flipped": ("the window with the largest summed |exact patching effect|",
                      _selected_by("patch_flipped", "window")),
    "attr_flipped": ("the window with the largest summed |attribution| on flipped pairs",
                     _selected_by("attr_flipped", "window")),
    "earliest": ("the first layers (layer index alone; no attribution)", lambda scores, width: 0),
}


#: Candidates that are not windows, compared with the criteria: the best window's reduction minus theirs.
ALTERNATIVES = {"all_matched": "all layers at the window's number of trainable parameters (rank scaled down)",
                "all_samerank": "all layers at the window's rank"}


def _score_means(scores: dict, key: str) -> np.ndarray | None:
    s = (scores.get("scores") or {}).get(key)
    if not s or any(v is None for v in s["mean"]):
        return None
    return np.asarray(s["mean"], dtype=float)


# ---------------------------------------------------------------- analysis


@dataclass
class AuditUnit:
    """One model's audit: its base model's and each candidate's per-pair rows (by pair id), its
    attribution (``layer_scores.json``) and the window it selected."""

    label: str
    base: dict
    arms: dict
    """candidate name -> per-pair rows."""
    candidates: list
    scores: dict
    selected: tuple
    cluster_prefix: str = ""
    """Prepended to each question id: units with their own data are their own clusters."""


def _cluster_sums(unit: AuditUnit, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
    """Per question of ``unit``: the number of pairs, and per candidate the summed flip reduction and
    |Δmargin| reduction of its pairs (base minus candidate)."""
    from mechmed.consistency import pair_group

    ids = sorted(set(unit.base).intersection(*(unit.arms[n] for n in names)))
    if not ids:
        raise MechmedError(f"audit {unit.label}: the candidates and the base model share no evaluated pair")
    groups = [unit.cluster_prefix + pair_group(unit.base[i]) for i in ids]
    keys, codes = np.unique(np.asarray(groups, dtype=str), return_inverse=True)
    n = np.bincount(codes, minlength=len(keys)).astype(float)
    bf = np.array([float(unit.base[i]["flip"]) for i in ids])
    bm = np.array([float(unit.base[i]["margin_diff"]) for i in ids])
    flips = np.stack([np.bincount(codes, bf - np.array([float(unit.arms[c][i]["flip"]) for i in ids]),
                                  minlength=len(keys)) for c in names])
    margins = np.stack([np.bincount(codes, bm - np.array([float(unit.arms[c][i]["margin_diff"]) for i in ids]),
                                    minlength=len(keys)) for c in names])
    return n, flips, margins, list(keys)


def _spearman_rows(x: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Spearman of the fixed ``x`` with each row of ``Y`` [B, k] (average ranks for ties; NaN where a
    side is constant)."""
    from scipy.stats import rankdata

    rx = rankdata(x)
    rx = rx - rx.mean()
    RY = rankdata(Y, axis=1)
    RY = RY - RY.mean(axis=1, keepdims=True)
    den = np.sqrt((rx ** 2).sum() * (RY ** 2).sum(axis=1))
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, RY @ rx / den, np.nan)


def _interval(values: np.ndarray, confidence: float = 0.95) -> list:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [None, None]
    a = 100 * (1 - confidence) / 2
    return [float(np.percentile(v, a)), float(np.percentile(v, 100 - a))]


def analyse(units: Sequence[AuditUnit], *, n_bootstrap: int = 1000, seed: int = 0,
            select_key: str = "gain_flipped", select_criterion: str | None = None) -> dict:
    """The audit over one or more units (seeds): see the module doc. Pooled numbers average the units
    (each unit's regret, rank and correlation are its own, since each selected on its own scores).

    Units with the same ``cluster_prefix`` share their questions (one model's data, several methods or
    seeds): they are resampled with the same question draws, a stratum each, so pooled intervals do
    not count a question twice. ``select_criterion`` names the :data:`CRITERIA` entry the selection
    used (default: the window of largest summed ``select_key``)."""
    rng = np.random.default_rng(seed)
    sums = [_cluster_sums(u, [c.name for c in u.candidates]) for u in units]
    strata: dict = {}  # prefix -> every question key of its units, in order of first appearance
    for u, (_, _, _, keys) in zip(units, sums):
        strata.setdefault(u.cluster_prefix, {}).update(dict.fromkeys(keys))
    weights = {}
    for prefix, keys in strata.items():
        G = len(keys)
        W = np.stack([np.bincount(d, minlength=G) for d in rng.integers(0, G, size=(n_bootstrap, G))]).astype(float)
        weights[prefix] = (W, {k: i for i, k in enumerate(keys)})
    per_unit = []
    for u, (n, flips, margins, keys) in zip(units, sums):
        W_all, pos = weights[u.cluster_prefix]
        W = W_all[:, [pos[k] for k in keys]]
        red_point = flips.sum(axis=1) / n.sum()
        red_boot = (W @ flips.T) / (W @ n)[:, None]  # [B, candidates]
        md_point = margins.sum(axis=1) / n.sum()
        md_boot = (W @ margins.T) / (W @ n)[:, None]
        shared = set(u.base).intersection(*u.arms.values())
        base_rate = float(np.mean([float(u.base[i]["flip"]) for i in shared]))
        per_unit.append(_unit_result(u, red_point, red_boot, md_point, md_boot, base_rate, int(n.sum()), len(keys),
                                     select_key))
    return _pooled(units, per_unit, select_key, select_criterion or criterion_of(select_key, "window"))


def criterion_of(key: str, strategy: str) -> str:
    """The :data:`CRITERIA` name of a selection by ``strategy`` on score ``key``."""
    return {("gain_flipped", "peak_end"): "gain_peak_end"}.get((key, strategy), key)


def _unit_result(u: AuditUnit, red, red_boot, md, md_boot, base_rate: float, n_pairs: int, n_questions: int,
                 select_key: str) -> dict:
    cands = u.candidates
    idx = {c.name: j for j, c in enumerate(cands)}
    windows = [j for j, c in enumerate(cands) if c.kind == "window"]
    same = [j for j, c in enumerate(cands) if c.kind in ("window", "random")]
    randoms = [j for j, c in enumerate(cands) if c.kind == "random"]
    width = len(u.selected)
    sel = next((j for j in windows if cands[j].layers == tuple(u.selected)), None)
    key_scores = _score_means(u.scores, select_key)
    rows = [{"name": c.name, "kind": c.kind, "layers": list(c.layers), "rank": c.rank,
             "predicted": None if key_scores is None else float(key_scores[list(c.layers)].sum()),
             "flip_reduction": float(red[j]), "flip_reduction_ci": _interval(red_boot[:, j]),
             "relative_reduction": float(red[j] / base_rate) if base_rate else None,
             "margin_diff_reduction": float(md[j]), "margin_diff_reduction_ci": _interval(md_boot[:, j]),
             "selected": j == sel} for j, c in enumerate(cands)]
    out = {"label": u.label, "base_flip_rate": base_rate, "n_pairs": n_pairs, "n_questions": n_questions,
           "selected": list(u.selected), "candidates": rows}
    # predicted against achieved over the same-size sets
    predictors = {}
    for key in (u.scores.get("scores") or {}):
        v = _score_means(u.scores, key)
        if v is not None and len(same) >= 3:
            predictors[key] = np.array([v[list(cands[j].layers)].sum() for j in same])
    if len(same) >= 3:
        predictors["layer_index"] = np.array([np.mean(cands[j].layers) for j in same])
    out["spearman"], out["_spearman_boot"] = {}, {}
    for key, x in predictors.items():
        boot = _spearman_rows(x, red_boot[:, same])
        out["spearman"][key] = {"rho": float(_spearman_rows(x, red[same][None, :])[0]), "ci": _interval(boot),
                                "n_undefined": int(np.sum(~np.isfinite(boot)))}
        out["_spearman_boot"][key] = boot
    best = windows[int(np.argmax(red[windows]))] if windows else None

    def against_best(j: int) -> dict:
        """The best window's reduction minus candidate j's: the difference to the window that did best
        (fixed at the point estimate), with its paired interval."""
        d = red_boot[:, best] - red_boot[:, j]
        return {"value": float(red[best] - red[j]), "ci": _interval(d), "_boot": d}

    if sel is not None:
        out["selected_rank"] = int(1 + np.sum(red[windows] > red[sel]))
        out["n_windows"] = len(windows)
        out["best_window"] = list(cands[best].layers)
        out["regret"] = against_best(sel)
        # max-type test of "every window does as well as the selected one": the bootstrap of the regret
        # statistic centred at the point estimates, so that it is 0 in expectation under that null
        out["regret"]["_null"] = ((red_boot[:, windows] - red[windows]).max(axis=1) - (red_boot[:, sel] - red[sel]))
        out["regret"]["p"] = float(np.mean(out["regret"]["_null"] >= out["regret"]["value"]))
        out["random_at_least_as_good"] = [int(np.sum(red[randoms] >= red[sel])), len(randoms)]
        for name in ("all_matched", "all_samerank"):
            if name in idx:
                d = red_boot[:, idx[name]] - red_boot[:, sel]
                out[f"{name}_minus_selected"] = {"value": float(red[idx[name]] - red[sel]), "ci": _interval(d),
                                                 "_boot": d}
    crit = {}
    for name, (_, pick) in CRITERIA.items():
        start = pick(u.scores, width)
        j = None if start is None else next((k for k in windows if cands[k].layers == tuple(range(start, start + width))),
                                            None)
        if j is not None:
            crit[name] = {"layers": list(cands[j].layers), "flip_reduction": float(red[j]), **_named(against_best(j))}
    for name in ALTERNATIVES:  # not windows: their "regret" against the best window may be negative
        if name in idx and best is not None:
            crit[name] = {"layers": list(cands[idx[name]].layers), "flip_reduction": float(red[idx[name]]),
                          **_named(against_best(idx[name]))}
    out["criteria"] = crit
    return out


def _named(d: dict) -> dict:
    return {"regret": d["value"], "regret_ci": d["ci"], "_boot": d["_boot"]}


def _pooled(units, per_unit: list, select_key: str, select_criterion: str) -> dict:
    """Means over units, with intervals from the units' paired resamples (draw b of every unit together)."""
    methods = {u.label.rsplit("seed", 1)[0].strip() for u in units}
    pooled: dict = {"n_units": len(units), "unit": "seed" if len(methods) == 1 else "run",
                    "select_key": select_key, "select_criterion": select_criterion}
    keys = set.intersection(*(set(u["_spearman_boot"]) for u in per_unit)) if per_unit else set()
    pooled["spearman"] = {}
    for key in sorted(keys, key=lambda k: (k == "layer_index", k)):
        boot = np.mean([u["_spearman_boot"][key] for u in per_unit], axis=0)
        pooled["spearman"][key] = {"rho": float(np.mean([u["spearman"][key]["rho"] for u in per_unit])),
                                   "ci": _interval(boot), "per_unit": [u["spearman"][key]["rho"] for u in per_unit]}
    if select_key in keys and "layer_index" in keys:  # layer index may take either sign: its |ρ| is the bar
        diff = (np.mean([u["_spearman_boot"][select_key] for u in per_unit], axis=0)
                - np.abs(np.mean([u["_spearman_boot"]["layer_index"] for u in per_unit], axis=0)))
        pooled["score_vs_index"] = {"value": pooled["spearman"][select_key]["rho"]
                                    - abs(pooled["spearman"]["layer_index"]["rho"]), "ci": _interval(diff)}
    with_sel = [u for u in per_unit if "regret" in u]
    if with_sel:
        value = float(np.mean([u["regret"]["value"] for u in with_sel]))
        null = np.mean([u["regret"]["_null"] for u in with_sel], axis=0)
        pooled["regret"] = {"value": value, "ci": _interval(np.mean([u["regret"]["_boot"] for u in with_sel], axis=0)),
                            "p": float(np.mean(null >= value)), "per_unit": [u["regret"]["value"] for u in with_sel]}
        pooled["selected_rank"] = [u["selected_rank"] for u in with_sel]
        pooled["n_windows"] = with_sel[0]["n_windows"]
        pooled["random_at_least_as_good"] = [sum(u["random_at_least_as_good"][i] for u in with_sel) for i in (0, 1)]
        for name in ("all_matched", "all_samerank"):
            key = f"{name}_minus_selected"
            if all(key in u for u in with_sel):
                pooled[key] = {"value": float(np.mean([u[key]["value"] for u in with_sel])),
                               "ci": _interval(np.mean([u[key]["_boot"] for u in with_sel], axis=0)),
                               "per_unit": [u[key]["value"] for u in with_sel]}
    pooled["criteria"] = {}
    for c in [c for c in [*CRITERIA, *ALTERNATIVES] if all(c in u["criteria"] for u in per_unit)]:
        regrets = [u["criteria"][c]["regret"] for u in per_unit]
        pooled["criteria"][c] = {"description": CRITERIA[c][0] if c in CRITERIA else ALTERNATIVES[c],
                                 "regret": float(np.mean(regrets)),
                                 "regret_ci": _interval(np.mean([u["criteria"][c]["_boot"] for u in per_unit], axis=0)),
                                 "per_unit": regrets, "windows": [u["criteria"][c]["layers"] for u in per_unit],
                                 "flip_reduction": float(np.mean([u["criteria"][c]["flip_reduction"]
                                                                  for u in per_unit]))}
    # pooled reduction of each candidate name shared by every unit (windows and all-layer sets)
    names = [r["name"] for r in per_unit[0]["candidates"]] if per_unit else []
    shared = [nm for nm in names if all(any(r["name"] == nm for r in u["candidates"]) for u in per_unit)]
    pooled["candidates"] = [{"name": nm, "flip_reduction": float(np.mean([_row(u, nm)["flip_reduction"]
                                                                          for u in per_unit]))}
                            for nm in shared]
    for u in per_unit:  # the resamples stay in memory only
        _drop_private(u)
    pooled["verdict"] = verdict({"pooled": pooled, "units": per_unit})
    return {"pooled": pooled, "units": per_unit}


def _drop_private(d):
    if isinstance(d, dict):
        for k in [k for k in d if k.startswith("_")]:
            d.pop(k)
        for v in d.values():
            _drop_private(v)


def _row(unit: dict, name: str) -> dict:
    return next(r for r in unit["candidates"] if r["name"] == name)


def _fmt_ci(ci, digits: int = 3, sign: str = "+") -> str:
    if not ci or ci[0] is None:
        return ""
    return f" [{ci[0]:{sign}.{digits}f}, {ci[1]:{sign}.{digits}f}]"


def verdict(audit: dict) -> str:
    """One paragraph: where the selected window ranks, what it costs against the best window, random
    sets and all layers, and whether its score predicts the outcome better than layer index."""
    p = audit["pooled"]
    key = p.get("select_key", "gain_flipped")
    many = p["n_units"] > 1
    over = f" over {p['n_units']} {p.get('unit', 'seed')}s" if many else ""
    mean = f", mean over {p.get('unit', 'seed')}s" if many else ""
    parts = []
    if "regret" in p:
        r = p["regret"]
        k, n = p["random_at_least_as_good"]
        parts.append(f"The selected window ranked {', '.join(map(str, p['selected_rank']))} of {p['n_windows']} "
                     f"windows{over} by the flips its training removed; the best window removed "
                     f"{r['value']:.3f} more of the flip rate{_fmt_ci(r['ci'], sign='')} (regret{mean}; p = "
                     f"{r['p']:.2g} that every window does as well as the selected one)")
        if n:
            parts.append(f"{k} of {n} random layer sets of the same size did at least as well")
        for name, what in (("all_matched", "all layers at the same number of trainable parameters"),
                           ("all_samerank", "all layers at the window's rank")):
            d = p.get(f"{name}_minus_selected")
            if d:
                how = "more" if d["value"] > 0 else "less" if d["value"] < 0 else "as much"
                parts.append(f"{what} removed {abs(d['value']):.3f} {how} of the flip rate than the selected "
                             f"window{_fmt_ci(d.get('ci'))}")
    rho = p["spearman"].get(key)
    idx = p["spearman"].get("layer_index")
    if rho and idx:
        parts.append(f"the selection's score ({key}) ranks the layer sets by what training achieves at Spearman "
                     f"ρ = {rho['rho']:+.2f}{_fmt_ci(rho['ci'], 2)}, layer index alone at ρ = {idx['rho']:+.2f}"
                     f"{_fmt_ci(idx['ci'], 2)} (negative: earlier layers do better)")
    text = "; ".join(parts) + "." if parts else "The audit has too few candidates to judge the selection."
    text = text[0].upper() + text[1:]
    if "regret" in p and rho and idx:
        gap = p.get("score_vs_index") or {"value": float("nan"), "ci": [None, None]}
        beats_index = gap["ci"][0] is not None and gap["ci"][0] > 0
        text += (" Verdict: the selection misses the window where training helps most" if p["regret"]["p"] < 0.05
                 else " Verdict: the selected window is not measurably worse than the best window")
        text += ("; its score, in the direction the selection reads it, predicts the outcome better than layer "
                 f"index (ρ minus layer index's |ρ|: {gap['value']:+.2f}{_fmt_ci(gap['ci'], 2)})." if beats_index else
                 "; its score, in the direction the selection reads it, does not predict the outcome measurably "
                 f"better than layer index does (ρ minus layer index's |ρ|: {gap['value']:+.2f}"
                 f"{_fmt_ci(gap['ci'], 2)}), so do not read it as where training will help most without this audit.")
    return text
