"""Layer-range selection: from per-layer scores to the layers training will target.

Strategies over a score vector s[0..L-1] (higher = more involved in the flip):

- ``window``: the contiguous window of width w with the largest Σ s (ties: the earliest);
- ``peak_end``: the contiguous window of width w that ends at the layer of largest s (or, when that
  layer is earlier than w − 1, the first w layers): the layers that build what enters at the peak;
- ``topk``: the k layers with the largest s (returned sorted);
- ``threshold``: every layer with s ≥ t.

Baselines the ablations need, of a given width w: ``early`` (0..w-1), ``middle`` (centred),
``late`` (L-w..L-1), ``all``, and ``random`` (w distinct layers drawn with a seed). Every range
carries its provenance (strategy, parameters, and the score file's hash when there is one).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from mechmed.config import STRATEGIES  # defined there so that the command line's parser needs no numpy
from mechmed.errors import MechmedError

BASELINES = ("early", "middle", "late", "all", "random")

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LayerRange:
    layers: tuple[int, ...]
    strategy: str
    params: dict = field(default_factory=dict)
    score: float | None = None
    """Σ of the scores over the selected layers (None for baselines without scores)."""

    def to_dict(self) -> dict:
        d = asdict(self)
        d["layers"] = list(self.layers)
        return d


def _scores(scores: Sequence[float]) -> np.ndarray:
    s = np.asarray(scores, dtype=float)
    if s.ndim != 1 or s.size == 0:
        raise MechmedError("layer scores: need one score per layer (got none)")
    if not np.isfinite(s).all():
        bad = int(np.flatnonzero(~np.isfinite(s))[0])
        raise MechmedError(f"layer scores: layer {bad} has a non-finite score; recompute the scores")
    return s


def _check_width(width: int, n_layers: int, option: str = "--width") -> None:
    if not 1 <= width <= n_layers:
        raise MechmedError(f"{option} {width}: must be between 1 and the model's {n_layers} layers")


def select(scores: Sequence[float], strategy: str = "window", *, width: int = 5, k: int = 5,
           threshold: float | None = None) -> LayerRange:
    """Pick layers from per-layer scores with one of :data:`STRATEGIES`."""
    s = _scores(scores)
    n = s.size
    if strategy == "window":
        _check_width(width, n)
        sums = np.convolve(s, np.ones(width), mode="valid")
        start = int(np.argmax(sums))
        return LayerRange(tuple(range(start, start + width)), "window", {"width": width}, float(sums[start]))
    if strategy == "peak_end":
        _check_width(width, n)
        start = window_ending_at(int(np.argmax(s)), width, n)
        return LayerRange(tuple(range(start, start + width)), "peak_end", {"width": width},
                          float(s[start:start + width].sum()))
    if strategy == "topk":
        _check_width(k, n, "--k")
        top = np.argsort(-s, kind="stable")[:k]
        return LayerRange(tuple(sorted(int(i) for i in top)), "topk", {"k": k}, float(s[top].sum()))
    if strategy == "threshold":
        if threshold is None:
            raise MechmedError("--strategy threshold needs --threshold T")
        chosen = np.flatnonzero(s >= threshold)
        if chosen.size == 0:
            raise MechmedError(f"--threshold {threshold}: no layer scores that high (max {s.max():.4g}); lower it")
        return LayerRange(tuple(int(i) for i in chosen), "threshold", {"threshold": threshold},
                          float(s[chosen].sum()))
    raise MechmedError(f"--strategy {strategy}: unknown; choose one of {', '.join(STRATEGIES)}")


def window_ending_at(layer: int, width: int, n_layers: int) -> int:
    """The first layer of the window of ``width`` that ends at ``layer`` (the first ``width`` layers when
    ``layer`` is earlier than ``width`` − 1)."""
    return min(max(layer - width + 1, 0), n_layers - width)


def baseline(name: str, n_layers: int, width: int, *, seed: int = 0, scores: Sequence[float] | None = None) -> LayerRange:
    """A baseline range of ``width`` layers (``all`` ignores the width)."""
    if name == "all":
        layers = tuple(range(n_layers))
    else:
        _check_width(width, n_layers)
        if name == "early":
            layers = tuple(range(width))
        elif name == "late":
            layers = tuple(range(n_layers - width, n_layers))
        elif name == "middle":
            start = (n_layers - width) // 2
            layers = tuple(range(start, start + width))
        elif name == "random":
            rng = np.random.default_rng(seed)
            layers = tuple(sorted(int(i) for i in rng.choice(n_layers, size=width, replace=False)))
        else:
            raise MechmedError(f"baseline {name!r}: unknown; choose one of {', '.join(BASELINES)}")
    score = None if scores is None else float(_scores(scores)[list(layers)].sum())
    params = {"width": len(layers)} | ({"seed": seed} if name == "random" else {})
    return LayerRange(layers, name, params, score)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_scores(path: str | Path) -> dict:
    from mechmed.io import read_json

    scores = read_json(path, "--scores")
    if not isinstance(scores, dict) or "scores" not in scores:
        raise MechmedError(f"--scores {path}: not a layer_scores.json written by mechmed attribute")
    return scores


def score_vector(scores: dict, key: str, path: str = "scores") -> list[float]:
    table = scores["scores"]
    if key not in table:
        raise MechmedError(f"--score {key}: not in {path}; it has {', '.join(table)}")
    values = table[key]["mean"]
    if any(v is None for v in values):
        raise MechmedError(f"--score {key}: missing for some layers in {path} (e.g. no flipped pairs); "
                           "choose another --score such as gain_all or attr_all")
    return [float(v) for v in values]


# ---------------------------------------------------------------- how sure the selection is

#: Score keys that are per-pair means, so that the pairs of ``layer_scores.json`` can be resampled.
RESAMPLABLE = ("gain_flipped", "gain_all", "attr_flipped", "attr_stable", "attr_all", "patch_flipped",
               "recovery_flipped")
#: Below this probability of being the best, select-layers warns that its choice is a near-tie.
P_BEST_THRESHOLD = 0.8


def per_pair_values(scores: dict, key: str) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """The per-pair rows behind score ``key`` of a ``layer_scores.json``: values [pairs, layers] (NaN where
    undefined), the mask of the pairs the score averages over, and each pair's question (its cluster;
    the pair id in files that do not record it)."""
    pairs = scores.get("pairs") or []
    if key not in RESAMPLABLE or not pairs:
        raise MechmedError(f"--score {key}: its uncertainty needs per-pair rows of a score in "
                           f"{', '.join(RESAMPLABLE)} (layer_scores.json from mechmed attribute)")
    flipped = np.array([bool(p["flipped"]) for p in pairs])
    if key.startswith(("patch", "recovery")):
        if any(p.get("patch_effect") is None for p in pairs):
            raise MechmedError(f"--score {key}: the attribution ran without exact patching; use gain_flipped")
        effect = np.array([p["patch_effect"] for p in pairs], dtype=float)
        if key == "patch_flipped":
            values = np.abs(effect)
        else:
            gap = np.array([p["m_q"] - p["m_p"] for p in pairs], dtype=float)[:, None]
            with np.errstate(divide="ignore", invalid="ignore"):
                values = np.where(np.abs(gap) > 1e-6, effect / gap, np.nan)
    else:
        values = np.abs(np.array([p["layer_attr"] for p in pairs], dtype=float))
        if key.startswith("gain"):
            values = np.diff(values, axis=1, prepend=0.0)
    mask = {"flipped": flipped, "stable": ~flipped, "all": np.ones_like(flipped)}[key.rsplit("_", 1)[1]]
    return values, mask, [str(p.get("question") or p["id"]) for p in pairs]


@dataclass(frozen=True)
class SelectionUncertainty:
    """How the selection of :func:`select` varies when the attributed questions are resampled."""

    strategy: str
    params: dict
    chosen: tuple[int, ...]
    p_chosen: float
    """Share of resamples in which the same selection (for a window: this window is the best) comes out."""
    candidates: list
    """``{"layers", "score", "ci", "p_best"}`` per candidate: every window of the width, or for topk and
    threshold every selection a resample made; ``score`` is Σ of the scores, ``ci`` its percentile interval."""
    inclusion: list
    """Per layer, the share of resamples whose selection contains it."""
    n_bootstrap: int
    n_questions: int
    confidence: float = 0.95
    unit: str = "question"

    def runner_up(self) -> dict | None:
        """The most often best candidate other than the chosen one."""
        others = [c for c in self.candidates if tuple(c["layers"]) != self.chosen]
        return max(others, key=lambda c: c["p_best"]) if others else None

    def near_tie(self, threshold: float = P_BEST_THRESHOLD) -> bool:
        return self.p_chosen < threshold

    def warning(self, threshold: float = P_BEST_THRESHOLD) -> str | None:
        """One line when the chosen selection comes out in fewer than ``threshold`` of the resamples."""
        if not self.near_tie(threshold):
            return None
        r = self.runner_up()
        alt = f"; next most often {_layers_text(r['layers'])} ({r['p_best']:.0%})" if r else ""
        return (f"the selection {_layers_text(self.chosen)} comes out in {self.p_chosen:.0%} of "
                f"{self.n_bootstrap} resamples of the {self.n_questions} attributed questions (below "
                f"{threshold:.0%}){alt}: a near-tie the data do not decide; compare those layers in training "
                "(mechmed ablate) before trusting either")

    def table(self) -> str:
        """The candidates as aligned text, most often best first."""
        lines = [f"{'layers':>10} {'score':>9} {f'{self.confidence:.0%} CI':>20} {'P(best)':>8}"]
        for c in sorted(self.candidates, key=lambda c: (-c["p_best"], -c["score"])):
            mark = "  <- selected" if tuple(c["layers"]) == self.chosen else ""
            ci = f"[{c['ci'][0]:.3f}, {c['ci'][1]:.3f}]"
            lines.append(f"{_layers_text(c['layers']):>10} {c['score']:9.3f} {ci:>20} {c['p_best']:8.2f}{mark}")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["chosen"] = list(self.chosen)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> SelectionUncertainty:
        names = {f.name for f in fields(cls)}
        return cls(**{**{k: v for k, v in d.items() if k in names}, "chosen": tuple(d["chosen"])})


def _layers_text(layers) -> str:
    layers = list(layers)
    if len(layers) > 1 and layers == list(range(layers[0], layers[-1] + 1)):
        return f"{layers[0]}-{layers[-1]}"
    return ",".join(map(str, layers))


def selection_uncertainty(values: np.ndarray, mask: np.ndarray, clusters: Sequence, strategy: str = "window", *,
                          width: int = 5, k: int = 5, threshold: float | None = None, n_bootstrap: int = 1000,
                          seed: int = 0, confidence: float = 0.95) -> SelectionUncertainty:
    """Resample the questions (clusters) with replacement ``n_bootstrap`` times, recompute the per-layer
    score (the mean of ``values`` over the ``mask`` pairs, as ``layer_scores`` does) and select again.

    A question's pairs share its image and answer, so the question is the unit: resampling pairs would
    understate the spread. For ``window`` every window of the width is a candidate, with its score sum,
    the percentile interval of that sum and the share of resamples in which it is the best window (ties:
    the earliest, as :func:`select`); ``topk`` and ``threshold`` list each distinct selection the
    resamples made and how often. Resamples without a masked pair are dropped."""
    X = np.asarray(values, dtype=float)
    mask = np.asarray(mask, dtype=bool)
    if X.ndim != 2 or mask.shape != (X.shape[0],) or len(clusters) != X.shape[0]:
        raise MechmedError("selection uncertainty: values must be [pairs, layers] with a mask and a cluster per pair")
    if not mask.any():
        raise MechmedError("selection uncertainty: no pairs in the score's set (e.g. no flipped pairs)")
    point = _masked_mean(np.ones((1, X.shape[0])), X, mask)[0]
    chosen = select(point, strategy, width=width, k=k, threshold=threshold)
    _, codes = np.unique(np.asarray(clusters, dtype=str), return_inverse=True)
    n_clusters = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n_clusters, size=(n_bootstrap, n_clusters))
    counts = np.stack([np.bincount(d, minlength=n_clusters) for d in draws])  # [B, G]
    S = _masked_mean(counts[:, codes].astype(float), X, mask)  # [B, L]
    S = S[np.isfinite(S).all(axis=1)]
    if S.shape[0] == 0:
        raise MechmedError("selection uncertainty: no resample kept a pair of the score's set")
    lo_q, hi_q = 100 * (1 - confidence) / 2, 100 * (1 + confidence) / 2
    n_layers = X.shape[1]
    if strategy == "window":
        sums = np.stack([np.convolve(s, np.ones(width), mode="valid") for s in S])  # [B, windows]
        best = sums.argmax(axis=1)
        point_sums = np.convolve(point, np.ones(width), mode="valid")
        cands = [{"layers": list(range(j, j + width)), "score": float(point_sums[j]),
                  "ci": [float(np.percentile(sums[:, j], lo_q)), float(np.percentile(sums[:, j], hi_q))],
                  "p_best": float(np.mean(best == j))} for j in range(sums.shape[1])]
        picks = [tuple(range(j, j + width)) for j in best]
    else:
        picks = []
        for s in S:
            try:
                picks.append(select(s, strategy, width=width, k=k, threshold=threshold).layers)
            except MechmedError:  # a threshold no layer reaches in this resample: an empty selection
                picks.append(())
        seen = sorted(set(picks) | {chosen.layers}, key=lambda c: -picks.count(c))
        cands = []
        for c in seen[:10] if chosen.layers in seen[:10] else [*seen[:9], chosen.layers]:
            tot = S[:, list(c)].sum(axis=1) if c else np.zeros(len(S))
            cands.append({"layers": list(c), "score": float(point[list(c)].sum()) if c else 0.0,
                          "ci": [float(np.percentile(tot, lo_q)), float(np.percentile(tot, hi_q))],
                          "p_best": picks.count(c) / len(picks)})
    inclusion = [float(np.mean([layer in p for p in picks])) for layer in range(n_layers)]
    p_chosen = next(c["p_best"] for c in cands if tuple(c["layers"]) == chosen.layers)
    return SelectionUncertainty(strategy, dict(chosen.params), chosen.layers, p_chosen, cands, inclusion,
                                int(len(S)), n_clusters, confidence)


def _masked_mean(weights: np.ndarray, X: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per row of ``weights`` [B, pairs]: the weighted mean over the masked pairs of each layer of ``X``
    [pairs, layers], NaN values left out (as ``layer_scores`` leaves them out)."""
    W = weights * mask[None, :]
    finite = np.isfinite(X)
    num = W @ np.where(finite, X, 0.0)
    den = W @ finite.astype(float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den > 0, num / den, np.nan)
