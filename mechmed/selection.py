"""Layer-range selection: from per-layer scores to the layers training will target.

Strategies over a score vector s[0..L-1] (higher = more involved in the flip):

- ``window``: the contiguous window of width w with the largest Σ s (ties: the earliest);
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from mechmed.errors import MechmedError

STRATEGIES = ("window", "topk", "threshold")
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
