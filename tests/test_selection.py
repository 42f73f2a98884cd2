"""Selection strategies against brute force, and the baselines."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from mechmed.errors import MechmedError
from mechmed.selection import baseline, select


@pytest.mark.parametrize("seed", range(5))
def test_window_and_topk_match_brute_force(seed):
    s = np.random.default_rng(seed).normal(size=12)
    for w in (1, 3, 5, 12):
        best = max(range(12 - w + 1), key=lambda i: (s[i:i + w].sum(), -i))
        r = select(s, "window", width=w)
        assert r.layers == tuple(range(best, best + w))
        assert r.score == pytest.approx(s[best:best + w].sum())
    for k in (1, 4):
        best = max(itertools.combinations(range(12), k), key=lambda c: s[list(c)].sum())
        assert select(s, "topk", k=k).layers == best


def test_threshold_and_errors():
    s = [0.1, 0.5, 0.9, 0.2]
    assert select(s, "threshold", threshold=0.5).layers == (1, 2)
    with pytest.raises(MechmedError, match="lower it"):
        select(s, "threshold", threshold=2)
    with pytest.raises(MechmedError, match="--width 5"):
        select(s, "window", width=5)
    with pytest.raises(MechmedError, match="unknown"):
        select(s, "best")
    with pytest.raises(MechmedError, match="layer 1"):
        select([0.1, float("nan")], "window", width=1)


def test_baselines():
    assert baseline("early", 34, 5).layers == (0, 1, 2, 3, 4)
    assert baseline("late", 34, 5).layers == (29, 30, 31, 32, 33)
    assert baseline("middle", 34, 5).layers == (14, 15, 16, 17, 18)
    assert baseline("all", 6, 3).layers == tuple(range(6))
    r1, r2 = baseline("random", 34, 5, seed=1), baseline("random", 34, 5, seed=1)
    assert r1 == r2 and len(set(r1.layers)) == 5
    with pytest.raises(MechmedError):
        baseline("late", 4, 5)
