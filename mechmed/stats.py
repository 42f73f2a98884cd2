"""Statistics for comparing paraphrase-consistency results (pure numpy/scipy).

Every function validates its input and raises :class:`~mechmed.errors.MechmedError` naming the
argument at fault. Results are frozen dataclasses with a ``to_dict()`` for JSON.

Alternatives use scipy's names: ``"two-sided"``, ``"greater"`` (estimate_1 > estimate_2, or mean >
threshold) and ``"less"``.

- :func:`wilson_interval`: Wilson score interval for a proportion.
- :func:`clustered_wilson_interval`: the same for trials that come in clusters (the pairs of one
  question), with the cluster-robust design effect.
- :func:`two_proportion_ztest`: pooled-variance z test for two independent proportions.
- :func:`mcnemar_exact`, :func:`mcnemar_from_pairs`: exact McNemar test for paired binary outcomes.
- :func:`mcnemar_clustered`: McNemar's test for pairs that come in clusters (an exact sign-flip
  test of the per-cluster differences; Durkalski et al. 2003's statistic).
- :func:`bootstrap_ci`, :func:`paired_bootstrap`: percentile bootstrap (vectorised resampling).
- :func:`one_sample_ttest`: Student t test of a mean against a threshold.
- :func:`auc`: ROC AUC by the Mann-Whitney rank formula.
- :func:`compare_proportions`: both Wilson intervals and the z test, for ``mechmed compare``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace

import numpy as np
from scipy import stats as _sps

from mechmed.errors import MechmedError

__all__ = [
    "BootstrapResult",
    "ClusteredInterval",
    "Interval",
    "TestResult",
    "auc",
    "bootstrap_ci",
    "clustered_wilson_interval",
    "compare_proportions",
    "mcnemar_clustered",
    "mcnemar_exact",
    "mcnemar_from_pairs",
    "one_sample_ttest",
    "paired_bootstrap",
    "two_proportion_ztest",
    "wilson_interval",
]

ALTERNATIVES = ("two-sided", "greater", "less")

# Largest number of resampled values held at once by the bootstrap (about 32 MiB of float64).
_BOOTSTRAP_CHUNK_ELEMENTS = 1 << 22


def _plain(value):
    """numpy scalars to Python scalars, so that ``to_dict()`` is JSON-ready."""
    if isinstance(value, np.generic):
        return value.item()
    return value


class _ToDict:
    def to_dict(self) -> dict:
        return {k: _plain(v) for k, v in asdict(self).items()}


@dataclass(frozen=True)
class Interval(_ToDict):
    """A confidence interval [low, high] around a point estimate."""

    low: float
    high: float
    estimate: float
    confidence: float = 0.95


@dataclass(frozen=True)
class ClusteredInterval(Interval):
    """A Wilson interval over clustered trials: ``n_effective`` = n / ``design_effect`` trials."""

    design_effect: float = 1.0
    n_clusters: int = 0
    n_effective: float = 0.0


@dataclass(frozen=True)
class TestResult(_ToDict):
    """A hypothesis test: statistic, p-value, the two estimates compared and their sample sizes.

    ``difference`` is ``estimate_1 - estimate_2``. For a one-sample test ``estimate_2`` is the
    reference value and ``n2`` is None.
    """

    __test__ = False  # not a pytest test class

    statistic: float
    p_value: float
    estimate_1: float
    estimate_2: float
    difference: float
    method: str
    n1: int
    n2: int | None
    alternative: str = "two-sided"


@dataclass(frozen=True)
class BootstrapResult(_ToDict):
    """A percentile bootstrap: estimate, interval [low, high], two-sided p-value for estimate = 0."""

    estimate: float
    low: float
    high: float
    p_value: float
    n: int
    n_resamples: int = 10000
    confidence: float = 0.95


# ---------------------------------------------------------------------------------------------
# validation


def _count(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise MechmedError(f"{name} = {value!r}: must be a whole number; pass a count")
    if isinstance(value, numbers.Integral):
        out = int(value)
    else:
        f = float(value)
        if not math.isfinite(f) or f != int(f):
            raise MechmedError(f"{name} = {value!r}: must be a whole number; pass a count")
        out = int(f)
    if out < 0:
        raise MechmedError(f"{name} = {out}: counts cannot be negative; pass a count >= 0")
    return out


def _successes(k_name: str, k, n_name: str, n) -> tuple[int, int]:
    k, n = _count(k_name, k), _count(n_name, n)
    if n == 0:
        raise MechmedError(f"{n_name} = 0: a proportion needs at least one trial; pass {n_name} >= 1")
    if k > n:
        raise MechmedError(f"{k_name} = {k} is larger than {n_name} = {n}; pass {k_name} <= {n_name}")
    return k, n


def _confidence(confidence) -> float:
    try:
        c = float(confidence)
    except (TypeError, ValueError):
        c = float("nan")
    if not 0.0 < c < 1.0:
        raise MechmedError(f"confidence = {confidence!r}: must lie strictly between 0 and 1, e.g. 0.95")
    return c


def _alternative(alternative) -> str:
    if alternative not in ALTERNATIVES:
        raise MechmedError(f"alternative = {alternative!r}: use one of {', '.join(ALTERNATIVES)}")
    return alternative


def _values(name: str, x) -> np.ndarray:
    try:
        a = np.asarray(x, dtype=float)
    except (TypeError, ValueError):
        raise MechmedError(f"{name}: must be a 1-D array of numbers; convert it first") from None
    if a.ndim != 1:
        raise MechmedError(f"{name}: must be 1-D, got shape {a.shape}; flatten it or pass one row")
    if a.size == 0:
        raise MechmedError(f"{name}: is empty; pass at least one value")
    bad = ~np.isfinite(a)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MechmedError(f"{name}[{i}] = {a[i]}: NaN or infinite values are not allowed; drop or fix them")
    return a


def _booleans(name: str, x) -> np.ndarray:
    a = np.asarray(x)
    if a.ndim != 1:
        raise MechmedError(f"{name}: must be 1-D, got shape {a.shape}; flatten it or pass one row")
    if a.size == 0:
        raise MechmedError(f"{name}: is empty; pass at least one value")
    if a.dtype == bool:
        return a
    try:
        f = a.astype(float)
    except (TypeError, ValueError):
        raise MechmedError(f"{name}: must hold booleans or 0/1; convert it first") from None
    bad = ~((f == 0) | (f == 1))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise MechmedError(f"{name}[{i}] = {a[i]!r}: must be a boolean or 0/1; fix the labels")
    return f == 1


def _same_length(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise MechmedError(
            f"{name_a} has {a.shape[0]} values but {name_b} has {b.shape[0]}; pass paired arrays of equal length"
        )


def _z_p_value(z: float, alternative: str) -> float:
    if alternative == "two-sided":
        return float(2.0 * _sps.norm.sf(abs(z)))
    if alternative == "greater":
        return float(_sps.norm.sf(z))
    return float(_sps.norm.cdf(z))


# ---------------------------------------------------------------------------------------------
# proportions


def _wilson(p: float, n: float, c: float) -> tuple[float, float]:
    z = float(_sps.norm.ppf(0.5 + c / 2.0))
    denom = 1.0 + z * z / n
    centre = (p + z * z / (2.0 * n)) / denom
    half = z * math.sqrt(p * (1.0 - p) / n + z * z / (4.0 * n * n)) / denom
    return (0.0 if p == 0 else max(0.0, centre - half)), (1.0 if p == 1 else min(1.0, centre + half))


def wilson_interval(k: int, n: int, confidence: float = 0.95) -> Interval:
    """Wilson score interval for the proportion p̂ = k/n.

    With z = Φ⁻¹(1 − α/2), α = 1 − confidence:
    (p̂ + z²/2n ± z·√(p̂(1−p̂)/n + z²/4n²)) / (1 + z²/n), clipped to [0, 1].
    """
    k, n = _successes("k", k, "n", n)
    c = _confidence(confidence)
    low, high = _wilson(k / n, n, c)
    return Interval(low=low, high=high, estimate=k / n, confidence=c)


def _cluster_codes(name: str, clusters, n: int) -> np.ndarray:
    """Cluster labels (any hashable values, one per trial) as codes 0..G−1."""
    labels = list(clusters)
    if len(labels) != n:
        raise MechmedError(f"{name}: {len(labels)} labels for {n} trials; give one cluster label per trial")
    codes: dict = {}
    return np.array([codes.setdefault(x, len(codes)) for x in labels], dtype=np.int64)


def clustered_wilson_interval(successes, clusters, confidence: float = 0.95) -> ClusteredInterval:
    """Wilson interval for a proportion whose trials come in clusters (several pairs of one question
    share its image and its answer, so they are not independent).

    p̂ = Σy/N. The cluster-robust variance of p̂ over G clusters is
    V = G/(G−1) · Σ_g (Σ_{i∈g} (y_i − p̂))² / N² (statsmodels' cluster covariance of a mean); the design
    effect d = max(1, V / (p̂(1−p̂)/N)) (N/G when p̂ is 0 or 1: one trial per cluster; N when G = 1), and the interval is the
    Wilson interval at the effective sample size N/d (Korn & Graubard 1998). With one trial per
    cluster d = N/(N−1): the plain Wilson interval at N − 1 trials.
    """
    y = _booleans("successes", successes).astype(float)
    n = y.shape[0]
    codes = _cluster_codes("clusters", clusters, n)
    c = _confidence(confidence)
    p = float(y.mean())
    g = int(codes.max()) + 1
    if g == 1:
        d = float(n)
    elif p in (0.0, 1.0):  # no variance to estimate: count each cluster once
        d = n / g
    else:
        sums = np.bincount(codes, weights=y - p, minlength=g)
        v = g / (g - 1) * float(np.sum(sums ** 2)) / n ** 2
        d = max(1.0, v / (p * (1.0 - p) / n))
    low, high = _wilson(p, n / d, c)
    return ClusteredInterval(low=low, high=high, estimate=p, confidence=c, design_effect=d, n_clusters=g,
                             n_effective=n / d)


def two_proportion_ztest(k1: int, n1: int, k2: int, n2: int, alternative: str = "two-sided") -> TestResult:
    """Pooled-variance z test of p₁ = p₂ for two independent proportions.

    z = (p̂₁ − p̂₂) / √(p̂(1 − p̂)(1/n₁ + 1/n₂)), p̂ᵢ = kᵢ/nᵢ, pooled p̂ = (k₁ + k₂)/(n₁ + n₂);
    p from the standard normal. If p̂ is 0 or 1 the samples are identical: z = 0, p = 1.
    """
    k1, n1 = _successes("k1", k1, "n1", n1)
    k2, n2 = _successes("k2", k2, "n2", n2)
    alternative = _alternative(alternative)
    p1, p2 = k1 / n1, k2 / n2
    pooled = (k1 + k2) / (n1 + n2)
    if pooled in (0.0, 1.0):
        z, p_value = 0.0, 1.0
    else:
        se = math.sqrt(pooled * (1.0 - pooled) * (1.0 / n1 + 1.0 / n2))
        z = (p1 - p2) / se
        p_value = _z_p_value(z, alternative)
    return TestResult(statistic=z, p_value=p_value, estimate_1=p1, estimate_2=p2, difference=p1 - p2,
                      method="two-proportion z test (pooled)", n1=n1, n2=n2, alternative=alternative)


def compare_proportions(name: str, k1: int, n1: int, k2: int, n2: int, confidence: float = 0.95) -> dict:
    """Proportions k₁/n₁ (A) and k₂/n₂ (B): both Wilson intervals and the two-sided pooled z test.

    Returns ``{"name", "a": Interval, "b": Interval, "test": TestResult}``, each as a dict; see
    :func:`wilson_interval` and :func:`two_proportion_ztest` for the formulas.
    """
    test = two_proportion_ztest(k1, n1, k2, n2)  # first, so that errors name k1, n1, k2, n2
    return {
        "name": str(name),
        "a": wilson_interval(k1, n1, confidence).to_dict(),
        "b": wilson_interval(k2, n2, confidence).to_dict(),
        "test": test.to_dict(),
    }


# ---------------------------------------------------------------------------------------------
# paired binary outcomes


def mcnemar_exact(b: int, c: int) -> TestResult:
    """Exact (binomial) McNemar test on the discordant counts of paired binary outcomes.

    b = pairs positive before and not after, c = the reverse. Under H₀ b ~ Binomial(b + c, ½):
    p = min(1, 2·F(min(b, c); b + c, ½)), F the binomial CDF; p = 1 when b + c = 0.
    The statistic is min(b, c); estimate_1 = b/(b + c) and estimate_2 = c/(b + c) are the
    shares of the discordant pairs (NaN when there are none), n1 = n2 = b + c.
    """
    b, c = _count("b", b), _count("c", c)
    n = b + c
    if n == 0:
        p_value = 1.0
        e1 = e2 = float("nan")
    else:
        p_value = min(1.0, 2.0 * float(_sps.binom.cdf(min(b, c), n, 0.5)))
        e1, e2 = b / n, c / n
    return TestResult(statistic=float(min(b, c)), p_value=p_value, estimate_1=e1, estimate_2=e2,
                      difference=e1 - e2, method="exact McNemar (binomial)", n1=n, n2=n)


def mcnemar_from_pairs(before, after) -> TestResult:
    """Exact McNemar test (see :func:`mcnemar_exact`) from two paired boolean arrays.

    b = Σ before ∧ ¬after, c = Σ ¬before ∧ after. Here estimate_1 and estimate_2 are the rates
    mean(before) and mean(after), difference = (b − c)/n, and n1 = n2 = n, the number of pairs.
    """
    x = _booleans("before", before)
    y = _booleans("after", after)
    _same_length("before", x, "after", y)
    b = int(np.count_nonzero(x & ~y))
    c = int(np.count_nonzero(~x & y))
    n = int(x.shape[0])
    r1, r2 = float(x.mean()), float(y.mean())
    return replace(mcnemar_exact(b, c), estimate_1=r1, estimate_2=r2, difference=(b - c) / n, n1=n, n2=n)


def _sign_flip_p(d: np.ndarray) -> float:
    """Two-sided p of T = Σ_g d_g when each integer d_g keeps or flips its sign with probability ½,
    independently: P(|T*| ≥ |T|), exactly. With w = |d| ≠ 0 and U the sum of the w that keep a plus
    sign, T* = 2U − Σw, and U is the sum over distinct weights v (k of them) of v · Binomial(k, ½)."""
    w = np.abs(d[d != 0]).astype(np.int64)
    if w.size == 0:
        return 1.0
    total, t = int(w.sum()), abs(int(d.sum()))
    dist = np.ones(1)
    for v, k in zip(*np.unique(w, return_counts=True)):
        step = np.zeros(int(v) * int(k) + 1)
        step[::int(v)] = _sps.binom.pmf(np.arange(k + 1), k, 0.5)
        dist = np.convolve(dist, step)  # direct (not FFT): tail probabilities keep their relative precision
    u = np.arange(total + 1)
    return float(min(1.0, dist[np.abs(2 * u - total) >= t].sum()))


def mcnemar_clustered(before, after, clusters) -> TestResult:
    """McNemar's test for paired binary outcomes that come in clusters (the pairs of one question).

    With D_g = Σ_{i∈g} (before_i − after_i) over cluster g: under H₀ (within a pair, before and
    after are exchangeable) each D_g is as likely as −D_g, independently over clusters. p is the
    exact two-sided sign-flip test of T = Σ_g D_g = b − c over the 2^G sign patterns (computed by
    convolution, not enumeration); 1 when no pair is discordant. With one pair per cluster it is
    the exact McNemar test; copying every pair k times within its cluster leaves p as it is. The
    statistic is Durkalski et al.'s (2003, Stat Med 22:2417) X² = (Σ_g D_g)² / Σ_g D_g², whose χ²₁
    approximation the exact test replaces (it is too small when few clusters are discordant).
    estimate_1 and estimate_2 are the rates mean(before) and mean(after), n1 = n2 = the pairs.
    """
    x = _booleans("before", before)
    y = _booleans("after", after)
    _same_length("before", x, "after", y)
    n = int(x.shape[0])
    codes = _cluster_codes("clusters", clusters, n)
    dg = np.bincount(codes, weights=x.astype(np.int64) - y.astype(np.int64)).round().astype(np.int64)
    den = float(np.sum(dg ** 2))
    stat = float(dg.sum()) ** 2 / den if den > 0 else 0.0
    r1, r2 = float(x.mean()), float(y.mean())
    return TestResult(statistic=stat, p_value=_sign_flip_p(dg), estimate_1=r1, estimate_2=r2,
                      difference=r1 - r2, method="McNemar clustered (exact sign-flip over clusters)", n1=n, n2=n)


# ---------------------------------------------------------------------------------------------
# bootstrap


def _apply_statistic(statistic: Callable, sample: np.ndarray) -> np.ndarray:
    """statistic over the last axis of a (resamples, n) block, checked to give one value per row."""
    try:
        out = statistic(sample, axis=-1)
    except TypeError as e:
        if "axis" in str(e):
            raise MechmedError(
                f"statistic {getattr(statistic, '__name__', statistic)!r} does not take an axis keyword; "
                "pass a function like np.mean or np.median, or wrap yours as f(x, axis)"
            ) from None
        raise
    out = np.asarray(out, dtype=float)
    if out.shape != sample.shape[:-1]:
        raise MechmedError(
            f"statistic returned shape {out.shape} for input {sample.shape} with axis=-1; "
            "it must reduce the given axis to one number per row"
        )
    return out


def _bootstrap(x: np.ndarray, statistic: Callable, n_resamples: int, confidence: float,
               seed: int | None) -> BootstrapResult:
    n_resamples = _count("n_resamples", n_resamples)
    if n_resamples < 1:
        raise MechmedError("n_resamples = 0: pass at least 1 (1000 or more for a stable interval)")
    c = _confidence(confidence)
    n = x.shape[0]
    estimate = float(_apply_statistic(statistic, x[None, :])[0])
    rng = np.random.default_rng(seed)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // n)
    boot = np.empty(n_resamples)
    for start in range(0, n_resamples, chunk):
        stop = min(n_resamples, start + chunk)
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = _apply_statistic(statistic, x[idx])
    alpha = 1.0 - c
    low, high = np.quantile(boot, [alpha / 2.0, 1.0 - alpha / 2.0])
    other_side = np.count_nonzero(boot <= 0.0) if estimate >= 0.0 else np.count_nonzero(boot >= 0.0)
    p_value = min(1.0, 2.0 * (other_side + 1) / (n_resamples + 1))
    return BootstrapResult(estimate=estimate, low=float(low), high=float(high), p_value=p_value, n=n,
                           n_resamples=n_resamples, confidence=c)


def bootstrap_ci(x, statistic: Callable = np.mean, n_resamples: int = 10000, confidence: float = 0.95,
                 seed: int | None = 0) -> BootstrapResult:
    """Percentile bootstrap interval for statistic(x), resampling the n values with replacement.

    θ̂ = statistic(x); θ*ᵦ = statistic(x[iᵦ]), iᵦ n indices drawn uniformly, b = 1…B;
    [low, high] = the α/2 and 1 − α/2 quantiles of θ*, α = 1 − confidence;
    p = min(1, 2·(#{θ*ᵦ on the other side of 0 from θ̂, 0 included} + 1)/(B + 1)).
    ``statistic`` must take an ``axis`` keyword (np.mean, np.median, ...): resamples are drawn
    as a (B, n) block and reduced along the last axis, without a Python loop over resamples.
    """
    return _bootstrap(_values("x", x), statistic, n_resamples, confidence, seed)


def paired_bootstrap(a, b, statistic: Callable = np.mean, n_resamples: int = 10000, confidence: float = 0.95,
                     seed: int | None = 0) -> BootstrapResult:
    """Percentile bootstrap of statistic(a − b) over pairs, resampling pair indices.

    dᵢ = aᵢ − bᵢ; θ̂ = statistic(d), then exactly as :func:`bootstrap_ci` on d: percentile
    interval and p = min(1, 2·(#{θ*ᵦ on the other side of 0 from θ̂} + 1)/(B + 1)).
    """
    x = _values("a", a)
    y = _values("b", b)
    _same_length("a", x, "b", y)
    return _bootstrap(x - y, statistic, n_resamples, confidence, seed)


# ---------------------------------------------------------------------------------------------
# means and ranks


def one_sample_ttest(x, threshold: float, alternative: str = "greater") -> TestResult:
    """Student t test of mean(x) against ``threshold`` (one-sided, mean > threshold, by default).

    t = (x̄ − threshold) / (s/√n), s the sample standard deviation (ddof 1), df = n − 1; p from
    scipy.stats.ttest_1samp. If all values are equal (s = 0): t = ±∞ with p = 0 or 1 by the side
    of the threshold they lie on, and t = 0, p = 1 if they equal it.
    """
    v = _values("x", x)
    if v.size < 2:
        raise MechmedError(f"x has {v.size} value: a t test needs at least 2; pass more values")
    try:
        t0 = float(threshold)
    except (TypeError, ValueError):
        t0 = float("nan")
    if not math.isfinite(t0):
        raise MechmedError(f"threshold = {threshold!r}: must be a finite number, e.g. 0.95")
    alternative = _alternative(alternative)
    mean = float(v.mean())
    if np.all(v == v[0]):
        if mean == t0:
            stat, p_value = 0.0, 1.0
        else:
            stat = math.copysign(math.inf, mean - t0)
            towards = {"two-sided": True, "greater": mean > t0, "less": mean < t0}[alternative]
            p_value = 0.0 if towards else 1.0
    else:
        res = _sps.ttest_1samp(v, t0, alternative=alternative)
        stat, p_value = float(res.statistic), float(res.pvalue)
    return TestResult(statistic=stat, p_value=p_value, estimate_1=mean, estimate_2=t0, difference=mean - t0,
                      method="one-sample t test", n1=int(v.size), n2=None, alternative=alternative)


def auc(scores, labels) -> float:
    """ROC AUC of ``scores`` for the positive ``labels``, by the Mann-Whitney rank formula.

    AUC = (R₁ − n₁(n₁ + 1)/2) / (n₁·n₀), R₁ the sum of the positives' ranks among all scores
    (ties get their average rank, so a tie counts ½), n₁ positives, n₀ negatives.
    NaN if only one class is present.
    """
    s = _values("scores", scores)
    y = _booleans("labels", labels)
    _same_length("scores", s, "labels", y)
    n1 = int(np.count_nonzero(y))
    n0 = int(y.size - n1)
    if n1 == 0 or n0 == 0:
        return float("nan")
    ranks = _sps.rankdata(s, method="average")
    u = float(ranks[y].sum()) - n1 * (n1 + 1) / 2.0
    return u / (n1 * n0)


def weighted_auc(scores, labels, weights) -> np.ndarray:
    """:func:`auc` of each row of ``weights`` (B × n case weights, e.g. how often a bootstrap drew each
    case): Σ_{i pos, j neg} w_i·w_j·(1[s_i > s_j] + ½·1[s_i = s_j]) / (Σ_pos w · Σ_neg w), by one sort;
    NaN where a row gives one class no weight. With integer weights it equals :func:`auc` of the cases
    repeated that often."""
    s = _values("scores", scores)
    y = _booleans("labels", labels)
    _same_length("scores", s, "labels", y)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if w.shape[1] != s.shape[0]:
        raise MechmedError(f"weights: {w.shape[1]} columns for {s.shape[0]} scores; give one weight per case")
    order = np.argsort(s, kind="stable")
    starts = np.flatnonzero(np.r_[True, np.diff(s[order]) != 0])  # the tie blocks of the sorted scores
    ws, ys = w[:, order], y[order]
    pos = np.add.reduceat(ws * ys, starts, axis=1)
    neg = np.add.reduceat(ws * ~ys, starts, axis=1)
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore", divide="ignore"):
        return (pos * (below + 0.5 * neg)).sum(1) / (pos.sum(1) * neg.sum(1))


def clustered_auc(scores, labels, clusters, n_resamples: int = 1000, confidence: float = 0.95,
                  seed: int | None = 0) -> dict:
    """:func:`auc` with a percentile interval from resampling whole clusters (a question's pairs share
    its image and answer) with replacement (:func:`weighted_auc` of the draw counts); resamples with
    one class only are dropped.

    Returns ``{"auc", "ci": [low, high], "n", "n_positive", "n_clusters", "n_resamples"}`` (the
    resamples that had both classes); ``auc`` and ``ci`` are None with one class only.
    """
    s = _values("scores", scores)
    y = _booleans("labels", labels)
    _same_length("scores", s, "labels", y)
    codes = _cluster_codes("clusters", clusters, s.shape[0])
    n1 = int(np.count_nonzero(y))
    g = int(codes.max()) + 1 if codes.size else 0
    out = {"auc": None, "ci": [None, None], "n": int(s.shape[0]), "n_positive": n1, "n_clusters": g,
           "n_resamples": 0}
    if n1 == 0 or n1 == s.shape[0]:
        return out
    c = _confidence(confidence)
    out["auc"] = auc(s, y)
    boot = [v[np.isfinite(v)] for v in (weighted_auc(s, y, w) for w in _cluster_draws(codes, n_resamples, seed))]
    boot = np.concatenate(boot)
    if boot.size:
        low, high = np.quantile(boot, [(1.0 - c) / 2.0, 1.0 - (1.0 - c) / 2.0])
        out["ci"], out["n_resamples"] = [float(low), float(high)], int(boot.size)
    return out


def _cluster_draws(codes: np.ndarray, n_resamples: int, seed: int | None):
    """Blocks of case weights (rows × n): how often each case's cluster was drawn, clusters resampled
    with replacement."""
    g = int(codes.max()) + 1
    rng = np.random.default_rng(seed)
    b = _count("n_resamples", n_resamples)
    chunk = max(1, _BOOTSTRAP_CHUNK_ELEMENTS // max(codes.size, g))
    for first in range(0, b, chunk):
        rows = min(chunk, b - first)
        draws = rng.integers(0, g, size=(rows, g)) + g * np.arange(rows)[:, None]
        counts = np.bincount(draws.ravel(), minlength=rows * g).reshape(rows, g).astype(np.float64)
        yield counts[:, codes]


def paired_clustered_auc(scores_a, labels_a, scores_b, labels_b, clusters, n_resamples: int = 2000,
                         confidence: float = 0.95, seed: int | None = 0) -> dict:
    """AUC(b) − AUC(a) on the same cases (the same pairs before and after a fix), with a percentile
    interval and a two-sided bootstrap p from resampling whole clusters, the same draw for both.

    p = min(1, 2·(#{resampled differences on the other side of 0 from the estimate, 0 included} + 1)/(B + 1)),
    over the resamples in which both have both classes. Returns ``{"auc_a", "auc_b", "difference",
    "ci": [low, high], "p_value", "n_resamples"}`` (None where one side has one class only).
    """
    sa, sb = _values("scores_a", scores_a), _values("scores_b", scores_b)
    ya, yb = _booleans("labels_a", labels_a), _booleans("labels_b", labels_b)
    for name, x in (("labels_a", ya), ("scores_b", sb), ("labels_b", yb)):
        _same_length("scores_a", sa, name, x)
    codes = _cluster_codes("clusters", clusters, sa.shape[0])
    out = {"auc_a": auc(sa, ya), "auc_b": auc(sb, yb), "difference": None, "ci": [None, None], "p_value": None,
           "n_resamples": 0}
    if not (out["auc_a"] == out["auc_a"] and out["auc_b"] == out["auc_b"]):
        out.update(auc_a=None if out["auc_a"] != out["auc_a"] else out["auc_a"],
                   auc_b=None if out["auc_b"] != out["auc_b"] else out["auc_b"])
        return out
    c = _confidence(confidence)
    est = out["auc_b"] - out["auc_a"]
    diffs = np.concatenate([weighted_auc(sb, yb, w) - weighted_auc(sa, ya, w)
                            for w in _cluster_draws(codes, n_resamples, seed)])
    diffs = diffs[np.isfinite(diffs)]
    out["difference"] = est
    if diffs.size:
        low, high = np.quantile(diffs, [(1.0 - c) / 2.0, 1.0 - (1.0 - c) / 2.0])
        other = np.count_nonzero(diffs <= 0.0) if est >= 0.0 else np.count_nonzero(diffs >= 0.0)
        out.update(ci=[float(low), float(high)], p_value=min(1.0, 2.0 * (other + 1) / (diffs.size + 1)),
                   n_resamples=int(diffs.size))
    return out


def expected_calibration_error(prob, labels, n_bins: int = 10) -> float:
    """ECE = Σ_b (n_b / n)·|ȳ_b − p̄_b| over ``n_bins`` equal-width bins of the predicted probability
    on [0, 1] (the last bin closed), ȳ_b the share of positive labels and p̄_b the mean probability in
    bin b (Guo et al. 2017)."""
    p = _values("prob", prob)
    y = _booleans("labels", labels).astype(float)
    _same_length("prob", p, "labels", y)
    if ((p < 0) | (p > 1)).any():
        raise MechmedError("prob: values outside [0, 1]; pass probabilities, not logits")
    n_bins = _count("n_bins", n_bins)
    if n_bins < 1 or p.size == 0:
        raise MechmedError("expected_calibration_error: give at least one bin and one prediction")
    b = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    total = 0.0
    for k in range(n_bins):
        inside = b == k
        if inside.any():
            total += inside.mean() * abs(float(y[inside].mean()) - float(p[inside].mean()))
    return float(total)


def coverage_at_risk(confidence, correct, risk: float = 0.05) -> dict:
    """Selective prediction: answer only the most confident cases. The largest share k/n of cases,
    taken in order of decreasing ``confidence`` (ties kept together), whose error rate is at most
    ``risk``; ``threshold`` is the lowest confidence answered (None when no prefix qualifies).

    Returns ``{"risk", "coverage", "n_answered", "n", "threshold", "error_rate"}``.
    """
    conf = _values("confidence", confidence)
    ok = _booleans("correct", correct)
    _same_length("confidence", conf, "correct", ok)
    if not 0 <= risk < 1:
        raise MechmedError(f"risk {risk!r}: give the tolerated error rate as a fraction in [0, 1), e.g. 0.05")
    order = np.argsort(-conf, kind="stable")
    errors = np.cumsum(~ok[order])
    counts = np.arange(1, conf.size + 1)
    ends = np.r_[np.flatnonzero(np.diff(conf[order]) != 0), conf.size - 1]  # the last case of each tie block
    good = ends[errors[ends] <= risk * counts[ends]]
    out = {"risk": float(risk), "coverage": 0.0, "n_answered": 0, "n": int(conf.size), "threshold": None,
           "error_rate": None}
    if good.size:
        k = int(good.max())
        out.update(coverage=(k + 1) / conf.size, n_answered=k + 1, threshold=float(conf[order][k]),
                   error_rate=float(errors[k] / (k + 1)))
    return out
