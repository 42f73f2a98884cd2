"""evaluate(): metrics recomputed by hand from independently computed margins."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as sps

from conftest import make_image
from mechmed.consistency import evaluate
from mechmed.data.records import ParaphrasePair
from mechmed.errors import MechmedError
from mechmed.readout import margins

PHRASINGS = [
    ("Is there a pleural effusion?", "Does this image show a pleural effusion?", False),
    ("Is there a pleural effusion?", "Is there any evidence of effusion?", False),
    ("Is there a pleural effusion?", "Is the chest normal?", True),
    ("Is there cardiomegaly?", "Is the heart normal?", True),
    ("Is there cardiomegaly?", "Does this radiograph show cardiomegaly?", False),
]


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    root = tmp_path_factory.mktemp("imgs")
    out = []
    for i in range(6):
        path = root / f"{i}.png"
        make_image(100 + i).save(path)
        for j, (q, p, neg) in enumerate(PHRASINGS):
            ans = "yes" if (i + j) % 2 else "no"
            out.append(ParaphrasePair(
                id=f"{i}-{j}", question=q, paraphrase=p, answer=ans, image=path,
                paraphrase_answer=({"yes": "no", "no": "yes"}[ans] if neg else ans),
                phenomenon="negation_pattern" if neg else "lexical_substitution", question_id=f"{i}:{q}"))
    return out


def test_metrics_match_hand_computation(tiny_bundles, pairs):
    from PIL import Image

    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    res = evaluate(b, pairs, batch_size=4, n_bootstrap=500)
    m = res.metrics
    imgs = [Image.open(p.image) for p in pairs]
    mq = margins(b, [p.question for p in pairs], imgs, batch_size=7).numpy()
    mp = margins(b, [p.paraphrase for p in pairs], imgs, batch_size=7).numpy()
    s = np.array([-1 if p.paraphrase_answer != p.answer else 1 for p in pairs])
    flips = np.sign(mq) != np.sign(s * mp)
    neg = s < 0  # the negated pairs are the negation set: reported apart from the headline
    keep = ~neg
    assert m["headline"] == "meaning_preserving" and m["n_questions"] == 12
    assert m["n_pairs"] == int(keep.sum()) and m["all"]["n_pairs"] == len(pairs)
    assert m["n_flips"] == int(flips[keep].sum()) and m["all"]["n_flips"] == int(flips.sum())
    assert m["flip_rate"] == pytest.approx(flips[keep].mean())
    assert m["negation"]["n_pairs"] == int(neg.sum())
    assert m["negation"]["flip_rate"] == pytest.approx(flips[neg].mean())
    assert m["negation"]["margin_diff"] == pytest.approx(np.abs(mq - s * mp)[neg].mean(), abs=1e-5)
    assert m["margin_diff"] == pytest.approx(np.abs(mq - s * mp)[keep].mean(), abs=1e-5)
    lo, hi = m["margin_diff_ci"]
    assert lo <= m["margin_diff"] <= hi
    exp_p = np.array([p.paraphrase_answer == "yes" for p in pairs])
    assert m["accuracy"]["paraphrase"] == pytest.approx(((mp > 0) == exp_p)[keep].mean())
    # question flip: any meaning-preserving pair of the question flips
    groups = {}
    for p, f, k in zip(pairs, flips, keep):
        if k:
            groups[p.question_id] = groups.get(p.question_id, False) or bool(f)
    assert m["question_flip_rate"] == pytest.approx(np.mean(list(groups.values())))
    # AUC over unique questions against scipy's Mann-Whitney U
    # (from the margins evaluate used: near-tied margins of a random tiny model can reorder by 1e-7
    # between batch sizes, which changes an AUC)
    used = np.array([r["margin_question"] for r in res.pairs])
    uq = {(p.image, p.question): (used[i], p.answer == "yes") for i, p in enumerate(pairs)}
    scores = np.array([v[0] for v in uq.values()])
    labels = np.array([v[1] for v in uq.values()])
    u = sps.mannwhitneyu(scores[labels], scores[~labels]).statistic
    assert m["auc"] == pytest.approx(u / (labels.sum() * (~labels).sum()), abs=1e-9)
    assert m["yes_rate"] == pytest.approx(np.concatenate([[v > 0 for v in scores], mp[keep] > 0]).mean())
    assert 0 <= m["blank_image_agreement"] <= 1 and 0 <= m["swap_sensitivity"] <= 1
    assert set(m["by_phenomenon"]) == {"negation_pattern", "lexical_substitution"}
    assert m["by_phenomenon"]["negation_pattern"]["flip_rate"] == pytest.approx(flips[neg].mean())
    assert [r["negation_set"] for r in res.pairs] == list(neg)
    row = res.pairs[0]
    assert row["margin_question"] == pytest.approx(float(mq[0]), abs=1e-5)
    # flip risk, from the margins evaluate used: |margin| against the flips by Mann-Whitney U, ECE and
    # coverage over the unique questions by hand
    risk = m["flip_risk"]
    used_q = used[keep]
    flipped = np.array([r["flip"] for r in res.pairs])[keep]
    u = sps.mannwhitneyu(-np.abs(used_q)[flipped], -np.abs(used_q)[~flipped]).statistic
    assert risk["auroc_margin"] == pytest.approx(u / (flipped.sum() * (~flipped).sum()), abs=1e-9)
    lo, hi = risk["auroc_margin_ci"]
    assert lo <= risk["auroc_margin"] <= hi and risk["n_questions"] == 12 and risk["n_flips"] == int(flipped.sum())
    prob = 1 / (1 + np.exp(-scores.astype(np.float64)))
    ece = sum(abs(labels[(prob >= k / 10) & ((prob < (k + 1) / 10) | (k == 9))].mean()
                  - prob[(prob >= k / 10) & ((prob < (k + 1) / 10) | (k == 9))].mean())
              * ((prob >= k / 10) & ((prob < (k + 1) / 10) | (k == 9))).mean()
              for k in range(10) if ((prob >= k / 10) & ((prob < (k + 1) / 10) | (k == 9))).any())
    assert risk["ece"] == pytest.approx(ece, abs=1e-12)
    right = (scores > 0) == labels
    conf = -np.sort(-np.abs(scores))
    ranked = right[np.argsort(-np.abs(scores), kind="stable")]
    best = max((k for k in range(1, 13) if (k == 12 or conf[k - 1] != conf[k])  # tied answers kept together
                and (~ranked[:k]).mean() <= 0.05), default=0)
    assert risk["coverage"]["risk"] == 0.05 and risk["coverage"]["coverage"] == pytest.approx(best / 12)
    from mechmed.consistency import flip_risk_of_rows

    assert flip_risk_of_rows(res.pairs, n_bootstrap=500) == risk  # the same from the per-pair rows alone


def test_controls_can_be_chosen(tiny_bundles, pairs):
    """controls="blank" runs only the gray-image control, with the value of the full run; a name that
    is not a control is an error."""
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    full = evaluate(b, pairs, batch_size=4, n_bootstrap=100).metrics
    for choice in ("blank", ["blank"]):
        m = evaluate(b, pairs, batch_size=4, n_bootstrap=100, controls=choice).metrics
        assert m["blank_image_agreement"] == full["blank_image_agreement"] and m["swap_sensitivity"] is None
    with pytest.raises(MechmedError, match="controls .'gray'.: use some of blank, swap"):
        evaluate(b, pairs, batch_size=4, n_bootstrap=100, controls="gray")


def test_blank_image_agreement_is_one_for_an_image_blind_model(tiny_bundles, pairs):
    """A text-only model ignores images: give it no images and the controls are absent."""
    b = tiny_bundles["Gemma3ForCausalLM"]
    text_pairs = [ParaphrasePair(p.id, p.question, p.paraphrase, p.answer) for p in pairs]
    m = evaluate(b, text_pairs, n_bootstrap=200).metrics
    assert m["blank_image_agreement"] is None and m["n_questions"] == 2


def test_empty_dataset_is_an_error(tiny_bundles):
    with pytest.raises(MechmedError, match="no pairs"):
        evaluate(tiny_bundles["Gemma3ForCausalLM"], [])


def test_negation_only_data_is_its_own_headline(tiny_bundles, pairs):
    """A file of negation pairs alone (the demo's negation_pairs.jsonl) reports them as its headline."""
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    neg = [p for p in pairs if p.in_negation_set]
    m = evaluate(b, neg, batch_size=4, n_bootstrap=100, controls=False).metrics
    assert m["headline"] == "negation" and m["negation"] is None and m["n_pairs"] == len(neg)
    # PSF-Med's negation_pattern counts as the negation set even when its answer is not inverted
    kept = ParaphrasePair("x", "Is there a pleural effusion?", "Is there no effusion?", "yes",
                          phenomenon="negation_pattern")
    assert kept.in_negation_set and not kept.negated


def test_sets_over_the_same_questions_share_their_margins(tiny_bundles, pairs):
    """Question margins computed for one set are reused by the next, with the same metrics as alone."""
    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    first, second = pairs[::2], pairs[1::2]
    keys = [{(p.image, p.question) for p in half} for half in (first, second)]
    assert keys[0] & keys[1]  # the two sets share questions about the same images
    shared: dict = {}
    evaluate(b, first, batch_size=4, n_bootstrap=100, controls=False, question_margins=shared)
    assert set(shared) == keys[0]
    reused = evaluate(b, second, batch_size=4, n_bootstrap=100, controls=False, question_margins=shared).metrics
    alone = evaluate(b, second, batch_size=4, n_bootstrap=100, controls=False).metrics
    assert set(shared) == keys[0] | keys[1]
    assert reused["n_flips"] == alone["n_flips"] and reused["flip_rate"] == alone["flip_rate"]
    assert reused["margin_diff"] == pytest.approx(alone["margin_diff"], abs=1e-5)


def _clustered_wilson_by_hand(y, groups):
    """Wilson's interval at n / d trials, d the cluster-robust variance of the mean over the binomial one
    (at least 1), or n / (questions) when there is no variance."""
    y, n = np.asarray(y, float), len(y)
    p, g = y.mean(), sorted(set(groups))
    if p in (0.0, 1.0):  # no variance to estimate: one trial per question
        d = n / len(g)
    else:
        sums = [sum(v - p for v, q in zip(y, groups) if q == c) for c in g]
        d = max(1.0, len(g) / (len(g) - 1) * sum(x * x for x in sums) / n ** 2 / (p * (1 - p) / n))
    ne, z = n / d, sps.norm.ppf(0.975)
    centre = (p + z * z / (2 * ne)) / (1 + z * z / ne)
    half = z / (1 + z * z / ne) * np.sqrt(p * (1 - p) / ne + z * z / (4 * ne * ne))
    return [0.0 if p == 0 else max(0.0, centre - half), 1.0 if p == 1 else min(1.0, centre + half)]


def _clustered_p(before, after, groups):
    """McNemar clustered by question on vectors assembled here (the test itself: tests/test_stats.py)."""
    from mechmed import stats

    return stats.mcnemar_clustered(before, after, groups).p_value


def test_quadrants_and_near_ties_by_hand(tiny_bundles, pairs):
    """Each pair's gray-image reliance is its question's answer changing under a uniform gray image (a
    forward of its own here); the quadrant counts and their Wilson intervals, clustered by question
    (whose pairs share its image reliance), follow by hand, and near-tie flips are the flips with both margins inside the tolerance."""
    from PIL import Image

    from mechmed.consistency import QUADRANTS
    from mechmed.readout import gray_like

    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    imgs = [Image.open(p.image) for p in pairs]
    mq = margins(b, [p.question for p in pairs], imgs, batch_size=5).numpy()
    mp = margins(b, [p.paraphrase for p in pairs], imgs, batch_size=5).numpy()
    gray = margins(b, [p.question for p in pairs], [gray_like(im) for im in imgs], batch_size=5).numpy()
    s = np.array([-1 if p.negated else 1 for p in pairs])
    flips = np.sign(mq) != np.sign(s * mp)
    reliant = (gray > 0) != (mq > 0)
    keep = ~np.array([p.in_negation_set for p in pairs])
    tol = float(np.quantile(np.abs(np.concatenate([mq, mp])), 0.8))  # a tolerance some flips fall inside
    res = evaluate(b, pairs, batch_size=4, n_bootstrap=100, controls="blank", near_tie=tol)
    m = res.metrics
    cells = {"consistent_reliant": ~flips & reliant, "consistent_blind": ~flips & ~reliant,
             "flipped_reliant": flips & reliant, "flipped_blind": flips & ~reliant}
    n = int(keep.sum())
    q = m["quadrants_gray"]
    assert q["definition"] == "gray" and m["quadrants"] is None  # the counterfactual control did not run
    assert q["n_pairs"] == n and q["clustered"]
    groups = [p.group for p, k in zip(pairs, keep) if k]
    for name in QUADRANTS:
        k = int(cells[name][keep].sum())
        assert q[name]["n"] == k and q[name]["share"] == pytest.approx(k / n)
        assert q[name]["ci"] == pytest.approx(_clustered_wilson_by_hand(cells[name][keep], groups), abs=1e-9)
    assert m["flip_rate_ci_clustered"] == pytest.approx(_clustered_wilson_by_hand(flips[keep], groups), abs=1e-9)
    assert sum(q[k]["n"] for k in QUADRANTS) == n
    assert [r["image_reliant_gray"] for r in res.pairs] == list(reliant)
    assert all(r["image_reliant"] is None for r in res.pairs)
    near = flips & (np.abs(mq) < tol) & (np.abs(mp) < tol)
    assert m["n_near_tie_flips"] == int(near[keep].sum()) and m["near_tie"] == tol
    assert m["near_tie_flip_rate"] == pytest.approx(near[keep].mean())
    assert [r["near_tie"] for r in res.pairs] == list(near)
    # without the blank control there is nothing to cross consistency with
    none = evaluate(b, pairs, batch_size=4, n_bootstrap=100, controls=False)
    assert none.metrics["quadrants"] is None and none.metrics["quadrants_gray"] is None
    assert all(r["image_reliant"] is None and r["image_reliant_gray"] is None for r in none.pairs)
    with pytest.raises(MechmedError, match="near_tie"):
        evaluate(b, pairs, near_tie=-1)


def test_counterfactual_reliance_by_hand(tiny_bundles, pairs):
    """The counterfactual control: a pair's own ``counterfactual_image`` where it has one (image 0's
    questions here name image 5's file), else another image asked the same question with the opposite
    label. Reliance is the question's answer changing between the two images, recomputed here with
    plain forwards; the quadrants follow, and ``image_reliance`` sets it beside the gray definition."""
    import dataclasses

    from PIL import Image

    from mechmed.consistency import QUADRANTS, counterfactual_images
    from mechmed.readout import gray_like

    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    given = pairs[-1].image  # image 5
    ps = [dataclasses.replace(p, counterfactual_image=given) if p.image == pairs[0].image else p for p in pairs]
    cf = counterfactual_images(ps, seed=3)
    answer = {(p.image, p.question): p.answer for p in ps}
    assert len(cf) == len(answer)  # every question has an image with the opposite label
    for key, (path, source) in cf.items():
        if key[0] == pairs[0].image:
            assert (path, source) == (given, "given")
        else:  # another image, the same question, the opposite label
            assert source == "opposite_label" and path != key[0] and answer[(path, key[1])] != answer[key]
    assert counterfactual_images(ps, seed=3) == cf  # seeded

    res = evaluate(b, ps, batch_size=4, n_bootstrap=100, seed=3)
    m = res.metrics
    imgs = [Image.open(p.image) for p in ps]
    mq = margins(b, [p.question for p in ps], imgs, batch_size=5).numpy()
    mp = margins(b, [p.paraphrase for p in ps], imgs, batch_size=5).numpy()
    mc = margins(b, [p.question for p in ps], [Image.open(cf[(p.image, p.question)][0]) for p in ps],
                 batch_size=5).numpy()
    mg = margins(b, [p.question for p in ps], [gray_like(im) for im in imgs], batch_size=5).numpy()
    s = np.array([-1 if p.negated else 1 for p in ps])
    flips = np.sign(mq) != np.sign(s * mp)
    reliant, gray = (mc > 0) != (mq > 0), (mg > 0) != (mq > 0)
    keep = ~np.array([p.in_negation_set for p in ps])
    assert [r["image_reliant"] for r in res.pairs] == list(reliant)
    assert [r["image_reliant_gray"] for r in res.pairs] == list(gray)
    q = m["quadrants"]
    assert q["definition"] == "counterfactual" and q["n_pairs"] == int(keep.sum())
    for name in QUADRANTS:
        cell = (flips if name.startswith("flipped") else ~flips) & (reliant if name.endswith("_reliant") else ~reliant)
        assert q[name]["n"] == int(cell[keep].sum())
    unique = {(p.image, p.question): bool(r) for p, r in zip(ps, reliant)}
    assert m["counterfactual_sensitivity"] == pytest.approx(np.mean(list(unique.values())))
    assert m["n_counterfactual"] == 12 and m["counterfactual_source"] == {"given": 2, "opposite_label": 10}
    ir = m["image_reliance"]
    yes = np.array([p.answer == "yes" for p in ps])
    assert ir["n_pairs"] == int(keep.sum())
    assert ir["counterfactual"] == pytest.approx(reliant[keep].mean()) and ir["gray"] == pytest.approx(gray[keep].mean())
    assert ir["agreement"] == pytest.approx((reliant == gray)[keep].mean())
    assert ir["by_answer"]["yes"]["gray"] == pytest.approx(gray[keep & yes].mean())
    assert ir["by_answer"]["no"]["counterfactual"] == pytest.approx(reliant[keep & ~yes].mean())
    for name, x in (("counterfactual", reliant), ("gray", gray)):  # majority lookups, by hand
        text = [p.question for p in ps]

        def lookup(keys, x=x):
            cells = {}
            for i in np.flatnonzero(keep):
                cells.setdefault(keys[i], []).append(bool(x[i]))
            return sum(max(c.count(True), c.count(False)) for c in cells.values()) / keep.sum()

        want = lookup([(t, a) for t, a in zip(text, yes)]) - lookup(text)
        assert ir["label_gain"][name] == pytest.approx(want)


def test_compare_crosses_quadrants_with_mcnemar(tiny_bundles, pairs, tmp_path):
    """compare reports both runs' quadrant shares and, per cell, McNemar of membership over the shared
    pairs (an exact binomial test of the discordant pairs, by hand), and McNemar clustered by question
    of the cells and of the flips, over the pairs and questions assembled here."""
    import json

    from mechmed.consistency import QUADRANTS, compare_runs
    from mechmed.io import write_json, write_jsonl

    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    a = evaluate(b, pairs, batch_size=4, n_bootstrap=100, controls="counterfactual")
    rows_b = [dict(r) for r in a.pairs]
    for r in rows_b[::3]:  # a second run: some pairs flip the other way, some lose the image
        r["flip"] = not r["flip"]
    for r in rows_b[1::4]:
        r["image_reliant"] = not r["image_reliant"]
    from mechmed.consistency import headline_rows, quadrant_counts

    head_b = headline_rows(rows_b)
    mb = {**a.metrics, "quadrants": {"definition": "counterfactual", **quadrant_counts(
        [r["flip"] for r in head_b], [r["image_reliant"] for r in head_b])}, "n_flips": sum(r["flip"] for r in head_b)}
    for d, m, rows in ((tmp_path / "a", a.metrics, a.pairs), (tmp_path / "b", mb, rows_b)):
        d.mkdir()
        write_json(d / "metrics.json", m)
        write_jsonl(d / "pairs.jsonl", rows)
    res = compare_runs(tmp_path / "a", tmp_path / "b")
    q = res["quadrants"]
    assert q["a"] == json.loads(json.dumps(a.metrics["quadrants"])) and q["b"]["n_pairs"] == len(head_b)
    head_a = {r["id"]: r for r in headline_rows(a.pairs)}
    for name in QUADRANTS:
        def cell(r, name=name):
            return r["flip"] == name.startswith("flipped") and r["image_reliant"] == name.endswith("reliant")

        b01 = sum(1 for r in head_b if not cell(head_a[r["id"]]) and cell(r))
        b10 = sum(1 for r in head_b if cell(head_a[r["id"]]) and not cell(r))
        want = 1.0 if b01 + b10 == 0 else sps.binomtest(min(b01, b10), b01 + b10, 0.5).pvalue
        assert q["p"][name] == pytest.approx(want)
        assert q["p_clustered"][name] == pytest.approx(_clustered_p(
            [cell(head_a[r["id"]]) for r in head_b], [cell(r) for r in head_b], [head_a[r["id"]]["question_id"]
                                                                                 for r in head_b]))
    paired = res["paired"]
    assert paired["mcnemar_flips_clustered"]["p_value"] == pytest.approx(_clustered_p(
        [head_a[r["id"]]["flip"] for r in head_b], [r["flip"] for r in head_b],
        [head_a[r["id"]]["question_id"] for r in head_b]))
    assert paired["n_common_questions"] == len({r["question_id"] for r in head_b})
    # how well |margin| foresees the flips, before and after, on the same pairs and the same question draws
    from mechmed import stats

    risk = res["flip_risk"]
    score = [-abs(head_a[r["id"]]["margin_question"]) for r in head_b]
    assert risk["n_common_pairs"] == len(head_b)
    assert risk["auc_a"] == pytest.approx(stats.auc(score, [head_a[r["id"]]["flip"] for r in head_b]))
    assert risk["auc_b"] == pytest.approx(stats.auc(score, [r["flip"] for r in head_b]))
    assert risk["difference"] == pytest.approx(risk["auc_b"] - risk["auc_a"])
    assert risk["ci"][0] <= risk["difference"] <= risk["ci"][1]


def test_compare_a_run_from_before_the_counterfactual_control(tiny_bundles, pairs, tmp_path):
    """A run written before 0.9.0 holds the gray-image quadrants in ``quadrants`` and ``image_reliant``:
    compare sets them against the new run's ``quadrants_gray`` / ``image_reliant_gray``, never against
    its counterfactual ones."""
    from mechmed.consistency import QUADRANTS, compare_runs
    from mechmed.io import write_json, write_jsonl

    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    new = evaluate(b, pairs, batch_size=4, n_bootstrap=100, controls=("blank", "counterfactual"))
    old_m = {k: v for k, v in new.metrics.items() if k not in ("quadrants_gray", "image_reliance")}
    old_m["quadrants"] = {k: v for k, v in new.metrics["quadrants_gray"].items() if k != "definition"}
    old_rows = [{**{k: v for k, v in r.items() if k != "image_reliant_gray"}, "image_reliant": r["image_reliant_gray"]}
                for r in new.pairs]
    for d, m, rows in ((tmp_path / "old", old_m, old_rows), (tmp_path / "new", new.metrics, new.pairs)):
        d.mkdir()
        write_json(d / "metrics.json", m)
        write_jsonl(d / "pairs.jsonl", rows)
    q = compare_runs(tmp_path / "old", tmp_path / "new")["quadrants"]
    assert q["definition"] == "gray" and q["b"]["definition"] == "gray"
    assert q["n_common_pairs"] == q["a"]["n_pairs"] == new.metrics["n_pairs"]  # the headline pairs
    assert all(q["p"][name] == 1.0 for name in QUADRANTS)  # the same cells
