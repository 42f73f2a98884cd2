"""mechmed.stats against independent references (statsmodels, scipy), with stated tolerances."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
from scipy import stats as sps
from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar
from statsmodels.stats.proportion import proportion_confint, proportions_ztest

from mechmed import stats
from mechmed.errors import MechmedError

# Closed-form quantities: agreement to floating-point precision.
TIGHT = 1e-10
# statsmodels / scipy alternative names.
SM_ALT = {"two-sided": "two-sided", "greater": "larger", "less": "smaller"}


# ---------------------------------------------------------------------------------------------
# seed-paper numbers


def test_seed_paper_flip_rates():
    r = stats.two_proportion_ztest(23, 158, 7, 158)
    assert abs(r.statistic - 3.07) < 0.01
    assert abs(r.p_value - 0.0021) < 2e-4
    assert r.estimate_1 == pytest.approx(23 / 158)
    assert r.estimate_2 == pytest.approx(7 / 158)
    assert r.difference == pytest.approx(16 / 158)
    assert (r.n1, r.n2, r.alternative) == (158, 158, "two-sided")


def test_seed_paper_accuracy_not_significant():
    r = stats.two_proportion_ztest(133, 158, 130, 158)
    assert r.p_value > 0.05


# ---------------------------------------------------------------------------------------------
# proportions


@pytest.mark.parametrize("k,n", [(0, 10), (1, 10), (5, 10), (10, 10), (23, 158), (7, 158), (133, 158), (1, 1)])
@pytest.mark.parametrize("confidence", [0.9, 0.95, 0.99])
def test_wilson_matches_statsmodels(k, n, confidence):
    lo, hi = proportion_confint(k, n, alpha=1 - confidence, method="wilson")
    r = stats.wilson_interval(k, n, confidence)
    assert r.low == pytest.approx(lo, abs=TIGHT)
    assert r.high == pytest.approx(hi, abs=TIGHT)
    assert r.estimate == k / n
    assert 0.0 <= r.low <= r.estimate <= r.high <= 1.0


@pytest.mark.parametrize("counts", [(23, 158, 7, 158), (133, 158, 130, 158), (3, 40, 9, 55), (0, 10, 4, 12),
                                    (12, 12, 5, 9)])
@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_ztest_matches_statsmodels(counts, alternative):
    k1, n1, k2, n2 = counts
    z, p = proportions_ztest([k1, k2], [n1, n2], alternative=SM_ALT[alternative])
    r = stats.two_proportion_ztest(k1, n1, k2, n2, alternative=alternative)
    assert r.statistic == pytest.approx(z, abs=TIGHT)
    assert r.p_value == pytest.approx(p, abs=TIGHT)


@pytest.mark.parametrize("counts", [(0, 10, 0, 20), (10, 10, 20, 20)])
def test_ztest_degenerate(counts):
    r = stats.two_proportion_ztest(*counts)
    assert (r.statistic, r.p_value) == (0.0, 1.0)


def test_compare_proportions_shape():
    d = stats.compare_proportions("flip_rate", 23, 158, 7, 158)
    json.dumps(d)
    assert d["name"] == "flip_rate"
    assert d["a"]["estimate"] == pytest.approx(23 / 158)
    assert d["b"]["estimate"] == pytest.approx(7 / 158)
    assert d["a"] == stats.wilson_interval(23, 158).to_dict()
    assert d["test"] == stats.two_proportion_ztest(23, 158, 7, 158).to_dict()


# ---------------------------------------------------------------------------------------------
# McNemar


@pytest.mark.parametrize("b,c", [(0, 0), (0, 1), (5, 5), (12, 3), (3, 12), (0, 9), (40, 25), (1, 0)])
def test_mcnemar_matches_statsmodels(b, c):
    ref = sm_mcnemar([[50, b], [c, 40]], exact=True)
    r = stats.mcnemar_exact(b, c)
    assert r.statistic == pytest.approx(ref.statistic, abs=TIGHT)
    assert r.p_value == pytest.approx(ref.pvalue, abs=TIGHT)


def test_mcnemar_exact_binomtest():
    # scipy's exact binomial test agrees whenever the split is not exactly even
    for b, c in [(12, 3), (2, 17), (30, 18)]:
        ref = sps.binomtest(b, b + c, 0.5).pvalue
        assert stats.mcnemar_exact(b, c).p_value == pytest.approx(ref, abs=TIGHT)


def test_mcnemar_from_pairs_counts_and_rates():
    before = np.array([1, 1, 1, 0, 0, 1, 0, 0, 1, 1], bool)
    after = np.array([0, 0, 1, 0, 1, 0, 0, 0, 0, 1], bool)
    r = stats.mcnemar_from_pairs(before, after)
    b, c = 4, 1
    assert r.p_value == pytest.approx(sm_mcnemar([[2, b], [c, 3]], exact=True).pvalue, abs=TIGHT)
    assert r.statistic == 1.0
    assert (r.estimate_1, r.estimate_2) == (0.6, 0.3)
    assert r.difference == pytest.approx((b - c) / 10)
    assert (r.n1, r.n2) == (10, 10)
    # 0/1 ints and lists are accepted
    r2 = stats.mcnemar_from_pairs(before.astype(int).tolist(), after.astype(int))
    assert r2 == r
    json.dumps(r.to_dict())


# ---------------------------------------------------------------------------------------------
# clustered pairs (several pairs of one question)


def _clustered_sample(seed: int, g: int = 60):
    """Clusters of 1-5 pairs whose flips share a cluster-level propensity (correlated within)."""
    rng = np.random.default_rng(seed)
    sizes = rng.integers(1, 6, size=g)
    labels = np.repeat([f"q{i}" for i in range(g)], sizes)
    prop_b = np.repeat(rng.beta(0.4, 1.2, size=g), sizes)
    before = rng.random(labels.size) < prop_b
    after = before & (rng.random(labels.size) < 0.6) | (~before & (rng.random(labels.size) < 0.05))
    return before, after, labels


def test_mcnemar_clustered_against_statsmodels_and_enumeration():
    # one pair per cluster: the exact McNemar test
    before, after, _ = _clustered_sample(0)
    b, c = int((before & ~after).sum()), int((~before & after).sum())
    table = [[int((before & after).sum()), b], [c, int((~before & ~after).sum())]]
    r = stats.mcnemar_clustered(before, after, np.arange(before.size))
    assert r.p_value == pytest.approx(sm_mcnemar(table, exact=True).pvalue, rel=1e-9)
    assert r.statistic == pytest.approx(sm_mcnemar(table, exact=False, correction=False).statistic, rel=1e-12)
    # few discordant pairs: five flips one way are p = 1/16 exactly (the chi-square would say 0.025)
    assert stats.mcnemar_clustered([1] * 5, [0] * 5, range(5)).p_value == pytest.approx(0.0625, rel=1e-12)
    # clustered: every one of the 2^12 sign patterns of the per-cluster differences, enumerated
    rng = np.random.default_rng(1)
    d = rng.integers(-3, 4, size=12)
    x, y, labels = [], [], []
    for g, v in enumerate(d):
        for _ in range(abs(int(v))):
            x.append(v > 0), y.append(v < 0), labels.append(f"q{g}")
        x.append(True), y.append(True), labels.append(f"q{g}")  # a concordant pair adds nothing
    t = abs(int(d.sum()))
    want = np.mean([abs(int(np.dot(signs, d))) >= t for signs in itertools.product((1, -1), repeat=d.size)])
    r = stats.mcnemar_clustered(x, y, labels)
    assert r.p_value == pytest.approx(want, rel=1e-12)
    assert r.statistic == pytest.approx(d.sum() ** 2 / (d ** 2).sum(), rel=1e-12)  # Durkalski's X²
    assert (r.estimate_1, r.estimate_2, r.n1) == (np.mean(x), np.mean(y), len(x))
    # 400 clusters of up to 3 pairs, p near 0.01: the exact p approaches Durkalski's chi-square one,
    # a little above it (the chi-square is too small by the discreteness it ignores)
    for seed in (0, 4):
        d = np.random.default_rng(seed).choice([-2, -1, 0, 1, 2], size=400, p=[0.08, 0.2, 0.42, 0.22, 0.08])
        x, y, labels = [], [], []
        for g, v in enumerate(d):
            x += [v > 0] * abs(int(v)) + [False]
            y += [v < 0] * abs(int(v)) + [False]
            labels += [g] * (abs(int(v)) + 1)
        r = stats.mcnemar_clustered(x, y, labels)
        approx = float(sps.chi2.sf(r.statistic, 1))
        assert approx < r.p_value < 1.2 * approx and r.p_value < 0.02
    # no discordant pair: p = 1
    assert stats.mcnemar_clustered([1, 0, 1], [1, 0, 1], ["a", "a", "b"]).p_value == 1.0


def test_copies_within_a_cluster_add_no_evidence():
    """Each pair copied three times into its own cluster: the plain McNemar p shrinks as if there
    were three times the data, the clustered test and interval stay where they were."""
    before, after, _ = _clustered_sample(2)
    ids = np.arange(before.size)
    b3, a3, l3 = np.repeat(before, 3), np.repeat(after, 3), np.repeat(ids, 3)
    one, three = stats.mcnemar_clustered(before, after, ids), stats.mcnemar_clustered(b3, a3, l3)
    assert three.statistic == pytest.approx(one.statistic, rel=1e-12)
    assert stats.mcnemar_from_pairs(b3, a3).p_value < stats.mcnemar_from_pairs(before, after).p_value / 10
    w1, w3 = stats.clustered_wilson_interval(after, ids), stats.clustered_wilson_interval(a3, l3)
    assert (w3.low, w3.high) == pytest.approx((w1.low, w1.high), rel=1e-12)
    assert w1.n_effective == pytest.approx(before.size - 1) and w3.design_effect == pytest.approx(
        3 * before.size / (before.size - 1))


@pytest.mark.parametrize("seed", [3, 4, 5])
def test_clustered_wilson_against_statsmodels(seed):
    """The design effect is statsmodels' cluster-robust variance of the mean over the binomial one;
    the interval statsmodels' Wilson interval at the effective sample size."""
    import statsmodels.api as sm

    y, _, labels = _clustered_sample(seed)
    groups = np.unique(labels, return_inverse=True)[1]
    fit = sm.OLS(y.astype(float), np.ones(y.size)).fit(cov_type="cluster", cov_kwds={"groups": groups})
    n, p = y.size, y.mean()
    r = stats.clustered_wilson_interval(y, labels)
    assert r.design_effect == pytest.approx(max(1.0, fit.bse[0] ** 2 / (p * (1 - p) / n)), rel=1e-9)
    assert r.design_effect > 1.2  # the sample is clustered: intervals are wider than Wilson's
    low, high = proportion_confint(p * r.n_effective, r.n_effective, alpha=0.05, method="wilson")
    assert (r.low, r.high) == pytest.approx((low, high), abs=TIGHT)
    plain = stats.wilson_interval(int(y.sum()), n)
    assert r.low < plain.low and r.high > plain.high and r.n_clusters == len(set(labels))
    # every trial in one cluster: one effective trial
    assert stats.clustered_wilson_interval([1, 0, 1, 1], ["a"] * 4).n_effective == pytest.approx(1.0)
    none = stats.clustered_wilson_interval([0, 0, 0, 0], ["a", "b", "b", "b"])  # no variance: a trial per question
    assert none.n_effective == pytest.approx(2.0) and (none.low, none.high) == pytest.approx(
        tuple(proportion_confint(0, 2, alpha=0.05, method="wilson")), abs=TIGHT)


# ---------------------------------------------------------------------------------------------
# bootstrap


def _bootstrap_tolerance(x: np.ndarray) -> float:
    # Two independent 10k-resample percentile endpoints differ by Monte Carlo error of order
    # 0.02 standard errors; allow 0.1 standard errors.
    return 0.1 * x.std(ddof=1) / math.sqrt(x.size)


def test_bootstrap_ci_matches_scipy():
    x = np.random.default_rng(1).gamma(2.0, 1.5, size=150)
    r = stats.bootstrap_ci(x, n_resamples=10000, seed=3)
    ref = sps.bootstrap((x,), np.mean, n_resamples=10000, method="percentile", confidence_level=0.95,
                        rng=np.random.default_rng(4)).confidence_interval
    tol = _bootstrap_tolerance(x)
    assert r.estimate == pytest.approx(x.mean(), abs=TIGHT)
    assert r.low == pytest.approx(ref.low, abs=tol)
    assert r.high == pytest.approx(ref.high, abs=tol)
    assert (r.n, r.n_resamples, r.confidence) == (150, 10000, 0.95)


def test_bootstrap_ci_generic_statistic_matches_scipy():
    x = np.random.default_rng(2).normal(size=101)
    r = stats.bootstrap_ci(x, statistic=np.median, n_resamples=5000, confidence=0.9, seed=0)
    ref = sps.bootstrap((x,), np.median, n_resamples=5000, method="percentile", confidence_level=0.9,
                        rng=np.random.default_rng(5)).confidence_interval
    tol = 2 * _bootstrap_tolerance(x)  # the median's bootstrap distribution is lumpier
    assert r.estimate == pytest.approx(np.median(x), abs=TIGHT)
    assert r.low == pytest.approx(ref.low, abs=tol)
    assert r.high == pytest.approx(ref.high, abs=tol)


def test_paired_bootstrap_matches_scipy():
    rng = np.random.default_rng(7)
    a = rng.normal(1.0, 1.0, size=120)
    b = a - 0.3 + rng.normal(0.0, 0.5, size=120)
    r = stats.paired_bootstrap(a, b, n_resamples=10000, seed=0)
    ref = sps.bootstrap((a, b), lambda u, v, axis: np.mean(u - v, axis=axis), paired=True, vectorized=True,
                        n_resamples=10000, method="percentile", rng=np.random.default_rng(8)).confidence_interval
    tol = _bootstrap_tolerance(a - b)
    assert r.estimate == pytest.approx((a - b).mean(), abs=TIGHT)
    assert r.low == pytest.approx(ref.low, abs=tol)
    assert r.high == pytest.approx(ref.high, abs=tol)
    # the shift is about 6 standard errors: no resample crosses 0, so p is the smallest possible
    assert r.p_value == pytest.approx(2 / 10001)


def test_paired_bootstrap_p_value_reference_loop():
    """Vectorised p-value and interval equal a plain loop over the same resampled indices."""
    rng = np.random.default_rng(11)
    a = rng.normal(size=40)
    b = a + rng.normal(0.05, 1.0, size=40)
    n_res = 2000
    r = stats.paired_bootstrap(a, b, n_resamples=n_res, seed=5)
    d = a - b
    idx = np.random.default_rng(5).integers(0, d.size, size=(n_res, d.size))
    boot = np.array([d[i].mean() for i in idx])
    est = d.mean()
    other = np.sum(boot <= 0) if est >= 0 else np.sum(boot >= 0)
    assert r.p_value == pytest.approx(min(1.0, 2 * (other + 1) / (n_res + 1)), abs=TIGHT)
    assert r.low == pytest.approx(np.quantile(boot, 0.025), abs=TIGHT)
    assert r.high == pytest.approx(np.quantile(boot, 0.975), abs=TIGHT)
    assert 0.0 < r.p_value <= 1.0


def test_bootstrap_chunking_does_not_change_result(monkeypatch):
    x = np.random.default_rng(3).normal(size=64)
    whole = stats.bootstrap_ci(x, n_resamples=1000, seed=9)
    monkeypatch.setattr(stats, "_BOOTSTRAP_CHUNK_ELEMENTS", 64 * 7)
    assert stats.bootstrap_ci(x, n_resamples=1000, seed=9) == whole


def test_bootstrap_is_seeded():
    x = np.arange(30.0)
    assert stats.bootstrap_ci(x, n_resamples=500, seed=1) == stats.bootstrap_ci(x, n_resamples=500, seed=1)
    assert stats.bootstrap_ci(x, n_resamples=500, seed=1) != stats.bootstrap_ci(x, n_resamples=500, seed=2)


def test_bootstrap_statistic_without_axis():
    with pytest.raises(MechmedError, match="axis"):
        stats.bootstrap_ci([1.0, 2.0, 3.0], statistic=lambda v: float(np.mean(v)), n_resamples=10)


# ---------------------------------------------------------------------------------------------
# t test


@pytest.mark.parametrize("alternative", ["greater", "less", "two-sided"])
def test_ttest_matches_scipy(alternative):
    r2 = np.clip(np.random.default_rng(0).normal(0.97, 0.02, size=25), 0, 1)
    ref = sps.ttest_1samp(r2, 0.95, alternative=alternative)
    r = stats.one_sample_ttest(r2, 0.95, alternative=alternative)
    assert r.statistic == pytest.approx(ref.statistic, abs=TIGHT)
    assert r.p_value == pytest.approx(ref.pvalue, abs=TIGHT)
    assert r.estimate_1 == pytest.approx(r2.mean())
    assert (r.estimate_2, r.n1, r.n2, r.alternative) == (0.95, 25, None, alternative)


def test_ttest_default_is_one_sided_greater():
    x = [0.96, 0.97, 0.99, 0.98, 0.95]
    assert stats.one_sample_ttest(x, 0.95) == stats.one_sample_ttest(x, 0.95, alternative="greater")


def test_ttest_constant_values():
    above = stats.one_sample_ttest([1.0, 1.0, 1.0], 0.95)
    assert (above.statistic, above.p_value) == (math.inf, 0.0)
    assert stats.one_sample_ttest([1.0, 1.0], 0.95, alternative="less").p_value == 1.0
    equal = stats.one_sample_ttest([0.95, 0.95], 0.95)
    assert (equal.statistic, equal.p_value) == (0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# AUC


def _auc_reference(scores, labels):
    scores, labels = np.asarray(scores, float), np.asarray(labels, bool)
    u = sps.mannwhitneyu(scores[labels], scores[~labels], alternative="two-sided").statistic
    return u / (labels.sum() * (~labels).sum())


def test_auc_known_values():
    assert stats.auc([0.1, 0.2, 0.8, 0.9], [0, 0, 1, 1]) == 1.0
    assert stats.auc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    assert stats.auc([0.5, 0.5, 0.5, 0.5], [0, 1, 0, 1]) == 0.5
    # one tie between a positive and a negative counts 1/2: (1 + 1 + 0.5 + 1) / 4
    assert stats.auc([0.1, 0.5, 0.5, 0.9], [False, False, True, True]) == pytest.approx(0.875)


def test_auc_matches_mannwhitney_with_ties():
    rng = np.random.default_rng(4)
    scores = rng.integers(0, 6, size=200).astype(float)  # many ties
    labels = rng.random(200) < 0.3 + 0.1 * scores
    assert stats.auc(scores, labels) == pytest.approx(_auc_reference(scores, labels), abs=TIGHT)


def test_auc_one_class_is_nan():
    assert math.isnan(stats.auc([0.1, 0.3], [True, True]))
    assert math.isnan(stats.auc([0.1, 0.3], [0, 0]))


# ---------------------------------------------------------------------------------------------
# randomized cross-check over a few seeds


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_randomized_against_references(seed):
    rng = np.random.default_rng(seed)
    n1, n2 = (int(v) for v in rng.integers(5, 400, size=2))
    k1, k2 = int(rng.integers(0, n1 + 1)), int(rng.integers(0, n2 + 1))
    z, p = proportions_ztest([k1, k2], [n1, n2])
    r = stats.two_proportion_ztest(k1, n1, k2, n2)
    if 0 < k1 + k2 < n1 + n2:
        assert r.statistic == pytest.approx(z, abs=TIGHT)
        assert r.p_value == pytest.approx(p, abs=TIGHT)
    lo, hi = proportion_confint(k1, n1, method="wilson")
    w = stats.wilson_interval(k1, n1)
    assert (w.low, w.high) == pytest.approx((lo, hi), abs=TIGHT)

    before = rng.random(300) < rng.random()
    after = rng.random(300) < rng.random()
    table = [[np.sum(before & after), np.sum(before & ~after)], [np.sum(~before & after), np.sum(~before & ~after)]]
    assert stats.mcnemar_from_pairs(before, after).p_value == pytest.approx(
        sm_mcnemar(table, exact=True).pvalue, abs=TIGHT)

    x = rng.normal(rng.normal(), rng.uniform(0.1, 2.0), size=int(rng.integers(3, 60)))
    ref = sps.ttest_1samp(x, 0.2, alternative="greater")
    t = stats.one_sample_ttest(x, 0.2)
    assert (t.statistic, t.p_value) == pytest.approx((ref.statistic, ref.pvalue), abs=TIGHT)

    scores = np.round(rng.normal(size=120), 1)
    labels = rng.random(120) < 0.5
    assert stats.auc(scores, labels) == pytest.approx(_auc_reference(scores, labels), abs=TIGHT)

    a = rng.normal(size=80)
    b = a + rng.normal(rng.normal(0, 0.3), 1.0, size=80)
    res = stats.paired_bootstrap(a, b, n_resamples=4000, seed=seed)
    ci = sps.bootstrap((a, b), lambda u, v, axis: np.mean(u - v, axis=axis), paired=True, vectorized=True,
                       n_resamples=4000, method="percentile", rng=rng).confidence_interval
    tol = 1.5 * _bootstrap_tolerance(a - b)  # 4k resamples: a little more Monte Carlo error
    assert res.low == pytest.approx(ci.low, abs=tol)
    assert res.high == pytest.approx(ci.high, abs=tol)
    assert res.low <= res.estimate <= res.high


# ---------------------------------------------------------------------------------------------
# results are named and JSON-ready


def test_results_are_frozen_and_serialisable():
    results = [
        stats.wilson_interval(np.int64(3), np.int64(10)),
        stats.two_proportion_ztest(3, 10, 5, 10),
        stats.mcnemar_exact(np.int64(3), 4),
        stats.mcnemar_clustered([1, 0, 1], [0, 0, 1], ["a", "a", "b"]),
        stats.clustered_wilson_interval([1, 0, 1], ["a", "a", "b"]),
        stats.bootstrap_ci([1.0, 2.0, 4.0], n_resamples=50),
        stats.one_sample_ttest([1.0, 2.0, 4.0], 1.0),
    ]
    for r in results:
        d = r.to_dict()
        json.dumps(d)
        assert all(not isinstance(v, np.generic) for v in d.values())
        with pytest.raises(AttributeError):
            r.low = 0  # type: ignore[misc]


# ---------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("call,match", [
    (lambda: stats.wilson_interval(1, 0), "n = 0"),
    (lambda: stats.wilson_interval(-1, 5), "k = -1"),
    (lambda: stats.wilson_interval(6, 5), "k = 6 is larger than n = 5"),
    (lambda: stats.wilson_interval(2.5, 5), "k = 2.5"),
    (lambda: stats.wilson_interval(2, 5, confidence=1.0), "confidence"),
    (lambda: stats.wilson_interval(2, 5, confidence=95), "confidence"),
    (lambda: stats.two_proportion_ztest(1, 10, 11, 10), "k2 = 11"),
    (lambda: stats.two_proportion_ztest(1, -10, 1, 10), "n1 = -10"),
    (lambda: stats.two_proportion_ztest(1, 10, 1, 0), "n2 = 0"),
    (lambda: stats.two_proportion_ztest(1, 10, 1, 10, alternative="larger"), "alternative"),
    (lambda: stats.compare_proportions("x", 5, 4, 1, 4), "k1 = 5"),
    (lambda: stats.mcnemar_exact(-1, 3), "b = -1"),
    (lambda: stats.mcnemar_exact(1, None), "c = None"),
    (lambda: stats.mcnemar_from_pairs([True, False], [True]), "before has 2 values but after has 1"),
    (lambda: stats.mcnemar_from_pairs([], []), "before: is empty"),
    (lambda: stats.mcnemar_from_pairs([0, 2], [0, 1]), r"before\[1\]"),
    (lambda: stats.mcnemar_clustered([0, 1], [0, 1], ["a"]), "clusters: 1 labels for 2 trials"),
    (lambda: stats.clustered_wilson_interval([], []), "successes: is empty"),
    (lambda: stats.paired_bootstrap([1.0, 2.0], [1.0]), "a has 2 values but b has 1"),
    (lambda: stats.paired_bootstrap([1.0, np.nan], [1.0, 2.0]), r"a\[1\] = nan"),
    (lambda: stats.paired_bootstrap([1.0, 2.0], [1.0, 2.0], n_resamples=0), "n_resamples"),
    (lambda: stats.bootstrap_ci([]), "x: is empty"),
    (lambda: stats.bootstrap_ci([[1.0, 2.0]]), "must be 1-D"),
    (lambda: stats.bootstrap_ci(["a", "b"]), "x: must be a 1-D array of numbers"),
    (lambda: stats.one_sample_ttest([1.0], 0.5), "at least 2"),
    (lambda: stats.one_sample_ttest([1.0, np.inf], 0.5), r"x\[1\] = inf"),
    (lambda: stats.one_sample_ttest([1.0, 2.0], float("nan")), "threshold"),
    (lambda: stats.one_sample_ttest([1.0, 2.0], 0.5, alternative="larger"), "alternative"),
    (lambda: stats.auc([0.1, 0.2, 0.3], [0, 1]), "scores has 3 values but labels has 2"),
    (lambda: stats.auc([0.1, np.nan], [0, 1]), r"scores\[1\]"),
    (lambda: stats.auc([0.1, 0.2], [0, 0.5]), r"labels\[1\]"),
    (lambda: stats.auc([], []), "scores: is empty"),
])
def test_bad_input_raises_mechmed_error(call, match):
    with pytest.raises(MechmedError, match=match) as info:
        call()
    assert "\n" not in str(info.value)


# --- flip risk: clustered AUROC, calibration, coverage at a risk -------------------------------


def test_weighted_auc_is_the_auc_of_the_repeated_cases():
    rng = np.random.default_rng(5)
    s = np.round(rng.normal(size=60), 1)  # ties on purpose
    y = rng.random(60) < 0.3
    w = rng.integers(0, 4, size=(20, 60))
    want = [stats.auc(np.repeat(s, row), np.repeat(y, row)) for row in w]
    np.testing.assert_allclose(stats.weighted_auc(s, y, w), want, rtol=0, atol=1e-12)
    assert stats.weighted_auc(s, y, np.ones(60))[0] == pytest.approx(stats.auc(s, y), abs=1e-12)


def test_clustered_auc_resamples_whole_clusters():
    """The interval from the same cluster draws, done by hand: concatenate the drawn clusters' cases."""
    rng = np.random.default_rng(1)
    clusters = np.repeat(np.arange(30), 3)
    s = rng.normal(size=90) + np.repeat(rng.normal(size=30), 3)
    y = (s + rng.normal(size=90)) > 0.8
    got = stats.clustered_auc(s, y, clusters, n_resamples=300, seed=7)
    draws = np.random.default_rng(7).integers(0, 30, size=(300, 30))
    boot = [stats.auc(s[idx], y[idx]) for idx in (np.concatenate([np.flatnonzero(clusters == g) for g in d])
                                                    for d in draws)]
    boot = [b for b in boot if b == b]
    assert got["auc"] == pytest.approx(stats.auc(s, y)) and got["n_resamples"] == len(boot)
    assert got["ci"] == pytest.approx(list(np.quantile(boot, [0.025, 0.975])), abs=1e-12)
    assert got["n_clusters"] == 30 and got["n_positive"] == int(y.sum())
    assert stats.clustered_auc(s, np.zeros(90, bool), clusters)["auc"] is None


def test_expected_calibration_error_by_hand():
    p = np.array([0.05, 0.08, 0.15, 0.55, 0.95, 1.0])
    y = np.array([0, 1, 0, 1, 1, 1], bool)
    # bins [0, .1): p̄ .065, ȳ .5; [.1, .2): .15, 0; [.5, .6): .55, 1; [.9, 1]: .975, 1
    want = 2 / 6 * abs(0.5 - 0.065) + 1 / 6 * 0.15 + 1 / 6 * 0.45 + 2 / 6 * 0.025
    assert stats.expected_calibration_error(p, y) == pytest.approx(want, abs=1e-12)
    assert stats.expected_calibration_error([0.0, 1.0], [False, True]) == 0.0
    with pytest.raises(MechmedError, match="outside"):
        stats.expected_calibration_error([1.5], [True])


def test_coverage_at_risk_is_the_longest_confident_prefix_within_the_risk():
    rng = np.random.default_rng(3)
    conf = np.round(rng.random(200), 2)
    right = rng.random(200) < 0.85 + 0.15 * conf
    for risk in (0.0, 0.02, 0.05, 0.1, 0.3):
        got = stats.coverage_at_risk(conf, right, risk)
        best = 0
        for t in np.unique(conf):  # answer every case at or above the threshold t
            kept = conf >= t
            if (~right[kept]).mean() <= risk:
                best = max(best, int(kept.sum()))
        assert got["n_answered"] == best and got["coverage"] == pytest.approx(best / 200), risk
        if best:
            assert got["error_rate"] <= risk and (conf >= got["threshold"]).sum() == best
    with pytest.raises(MechmedError, match="risk"):
        stats.coverage_at_risk(conf, right, 1.0)


def test_paired_clustered_auc_draws_the_same_clusters_for_both():
    rng = np.random.default_rng(2)
    clusters = np.repeat(np.arange(25), 4)
    y = rng.random(100) < 0.3
    a = rng.normal(size=100) + 0.3 * y
    b = a + 1.0 * y + rng.normal(size=100) * 0.5  # b foresees the positives better
    got = stats.paired_clustered_auc(a, y, b, y, clusters, n_resamples=400, seed=4)
    draws = np.random.default_rng(4).integers(0, 25, size=(400, 25))
    diffs = []
    for d in draws:
        idx = np.concatenate([np.flatnonzero(clusters == g) for g in d])
        diffs.append(stats.auc(b[idx], y[idx]) - stats.auc(a[idx], y[idx]))
    diffs = np.array([x for x in diffs if x == x])
    assert got["difference"] == pytest.approx(stats.auc(b, y) - stats.auc(a, y))
    assert got["ci"] == pytest.approx(list(np.quantile(diffs, [0.025, 0.975])), abs=1e-12)
    assert got["p_value"] == pytest.approx(min(1.0, 2 * ((diffs <= 0).sum() + 1) / (diffs.size + 1)))
    assert got["difference"] > 0 and got["p_value"] < 0.05
