"""Paraphrase-consistency evaluation: margins on both phrasings of every pair, and the metrics.

Definitions (one place; docs/metrics.md repeats them):

- margin m: the yes/no readout margin at the answer position, logsumexp over the yes variants'
  logits minus the same over the no variants' (:mod:`mechmed.readout`).
- For a pair (question q, paraphrase p), s = −1 if the paraphrase is negated (its expected answer
  is the opposite of the question's), else +1.
- flip: sign(m_q) ≠ sign(s · m_p), i.e. the two answers are not related as the labels are.
- Negation apart: a pair whose paraphrase inverts the answer (negated, or phenomenon
  ``negation_pattern``) is an operator, not a paraphrase. The headline metrics (``flip_rate``,
  ``n_flips``, ``n_pairs``, ``margin_diff``, paraphrase accuracy, ``question_flip_rate``) are over
  the meaning-preserving pairs; ``negation`` holds the same over the negation set, and ``all``
  over every pair. A data set with only negation pairs reports them as its headline
  (``headline == "negation"``).
- flip_rate: flips / pairs, with a Wilson 95% interval.
- question_flip_rate: a question (all pairs sharing ``question_id``) flips if any of its pairs flips.
- margin_diff: mean |m_q − s · m_p| over pairs, with a bootstrap 95% interval.
- accuracy: sign(m) agrees with the expected answer; for questions (each unique image+question
  once) and for paraphrases (each pair).
- auc: ROC AUC of the margin as a score for "yes", over unique questions (and over paraphrases).
- yes_rate: fraction of all answers (questions and paraphrases) that are yes.
- blank_image_agreement: fraction of questions whose answer is unchanged when the image is replaced
  by uniform gray (1.0 = the image is ignored).
- image-reliant pair (the counterfactual control): the answer to its question changes when the
  image is replaced by its counterfactual, an image whose answer to the same question is the
  opposite: the pair's ``counterfactual_image`` (the same patient with the asked finding toggled,
  as the demo writes), else, seeded, another image of the set asked the same question with the
  opposite label (:func:`counterfactual_images`). A model whose answer follows the finding changes
  its answer. ``quadrants`` crosses it with consistency over the headline pairs that have a
  counterfactual: ``consistent_reliant``, ``consistent_blind`` (consistent, but the same answer
  whatever the finding), ``flipped_reliant`` and ``flipped_blind``, each a count and a share with its
  Wilson 95% interval. ``counterfactual_sensitivity``: the share of questions whose answer changes.
- gray-image reliance (the blank control; ``quadrants_gray``, ``image_reliant_gray``): the answer
  changes when the image is replaced by uniform gray. Its confound: a model gives one answer per
  finding to a gray image, so "reliant" mostly says whether the label differs from that finding's
  gray answer. ``image_reliance`` puts the two definitions side by side (share reliant, overall and
  per expected answer, and how often they agree).
- near-tie flip: a flip whose two margins are both within ``near_tie`` logits of 0 (default 0.1);
  ``n_near_tie_flips`` and ``near_tie_flip_rate`` (over the headline pairs) show how much of a
  flip rate is this fragile part.
- swap_sensitivity: fraction of questions whose answer changes when the image is replaced by another
  question's image (a fixed, seeded derangement over distinct images).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from mechmed.data.images import load_image  # noqa: F401  (mechmed.consistency.load_image, as before)
from mechmed.data.records import ParaphrasePair
from mechmed.errors import MechmedError
from mechmed.readout import pair_margins

#: The image controls :func:`evaluate` can run: a uniform gray image, another pair's image, and the
#: counterfactual image (the asked finding toggled, or another image with the opposite label).
CONTROLS = ("blank", "swap", "counterfactual")
#: Margins within this many logits of 0 on both phrasings make a flip a near tie.
NEAR_TIE = 0.1
#: The four cells of consistency × image reliance, in display order.
QUADRANTS = ("consistent_reliant", "consistent_blind", "flipped_reliant", "flipped_blind")
#: The error rate at which ``flip_risk`` reports the coverage of the canonical answers (``--risk``).
RISK = 0.05


def pair_group(row: dict) -> str:
    """The question a per-pair row belongs to (``question_id``, else image + question), as
    :attr:`mechmed.data.ParaphrasePair.group`: the pairs of one question are one cluster."""
    return row.get("question_id") or f"{row.get('image')}::{row.get('question')}"


def quadrant_counts(flips: Sequence[bool], reliant: Sequence[bool], clusters: Sequence | None = None) -> dict:
    """Consistency × image reliance over pairs: per cell ``n``, ``share`` and its Wilson 95% ``ci``;
    with ``clusters`` (the question of each pair, which all its pairs share the image reliance of)
    the interval is :func:`mechmed.stats.clustered_wilson_interval`'s and ``clustered`` is True."""
    from mechmed import stats

    flips, reliant = np.asarray(flips, bool), np.asarray(reliant, bool)
    n = len(flips)
    cells = {"consistent_reliant": ~flips & reliant, "consistent_blind": ~flips & ~reliant,
             "flipped_reliant": flips & reliant, "flipped_blind": flips & ~reliant}
    out: dict = {"n_pairs": n, "clustered": clusters is not None}
    for name in QUADRANTS:
        k = int(cells[name].sum())
        ci = None
        if n:
            ci = (stats.wilson_interval(k, n) if clusters is None
                  else stats.clustered_wilson_interval(cells[name], clusters))
        out[name] = {"n": k, "share": k / n if n else None, "ci": [ci.low, ci.high] if ci else [None, None]}
    return out


@dataclass
class Evaluation:
    """What :func:`evaluate` returns: the metrics and one row per pair."""

    metrics: dict
    pairs: list[dict] = field(default_factory=list)


def _derangement(n: int, rng: np.random.Generator) -> np.ndarray:
    if n < 2:
        return np.arange(n)
    perm = rng.permutation(n)
    return np.roll(perm, 1)[np.argsort(perm)]  # each i goes to a different j


def _set_metrics(flips: np.ndarray, delta: np.ndarray, correct_p: np.ndarray, clusters: list, seed: int,
                 n_bootstrap: int) -> dict:
    """Flip rate (Wilson interval, and clustered by question), |Δmargin| (bootstrap interval) and
    paraphrase accuracy of one set."""
    from mechmed import stats

    n, k = len(flips), int(flips.sum())
    ci = stats.wilson_interval(k, n)
    cl = stats.clustered_wilson_interval(flips, clusters)
    md = stats.bootstrap_ci(delta, n_resamples=n_bootstrap, seed=seed)
    return {"n_pairs": n, "n_flips": k, "flip_rate": k / n, "flip_rate_ci": [ci.low, ci.high],
            "flip_rate_ci_clustered": [cl.low, cl.high], "flip_rate_design_effect": cl.design_effect,
            "margin_diff": float(delta.mean()), "margin_diff_ci": [md.low, md.high],
            "accuracy_paraphrase": float(correct_p.mean()), "n_correct_paraphrase": int(correct_p.sum())}


def evaluate(bundle, pairs: Sequence[ParaphrasePair], *, batch_size: int = 16, seed: int = 0,
             controls: bool | Sequence[str] = True, n_bootstrap: int = 2000, progress: bool = False,
             question_margins: dict | None = None, edit=None, near_tie: float = NEAR_TIE,
             risk: float = RISK) -> Evaluation:
    """Run both phrasings of every pair and compute the consistency metrics (see module doc).
    ``controls``: the image controls to run, ``blank`` and ``swap`` (True: both, False: none).
    ``question_margins``: as :func:`pair_margins` (share it between sets over the same questions).
    ``edit``: a training-free fix (:mod:`mechmed.interventions`) that computes every margin,
    the controls' included. ``near_tie``: the margin tolerance of a near-tie flip (logits). ``risk``:
    the error rate at which ``flip_risk`` reports the coverage of the canonical answers."""
    from mechmed import stats
    from mechmed.readout import gray_like, margins

    pairs = list(pairs)
    if not pairs:
        raise MechmedError("the dataset has no pairs: nothing to evaluate")
    check_risk(risk)
    if not (isinstance(near_tie, (int, float)) and near_tie >= 0):
        raise MechmedError(f"near_tie {near_tie!r}: give a non-negative margin tolerance in logits, e.g. 0.1")
    if edit is not None:
        if question_margins:
            raise MechmedError("evaluate: question_margins holds plain margins and edit computes its own; give one "
                               "of them")
        edit.prepare(pairs)
    m_q, m_p, keys, m_unique, images = pair_margins(bundle, pairs, batch_size=batch_size, progress=progress,
                                                    question_margins=question_margins, edit=edit)

    def run(questions, imgs, desc, rows=keys):
        # ``rows``: the question keys in the order of ``questions`` (an edit such as the ensemble reads
        # each question's own rewordings by them)
        if edit is None:
            return margins(bundle, questions, imgs, batch_size=batch_size, progress=desc if progress else None)
        return edit.margins(bundle, questions, imgs, role="question", rows=rows, batch_size=batch_size,
                            progress=desc if progress else None)

    sign = np.array([-1.0 if p.negated else 1.0 for p in pairs])
    yes_q, yes_p = m_q > 0, m_p > 0
    flips = (yes_q != yes_p) ^ (sign < 0)
    near = flips & (np.abs(m_q) < near_tie) & (np.abs(m_p) < near_tie)
    delta = np.abs(m_q - sign * m_p)
    correct_p = yes_p == np.array([p.expected_paraphrase == "yes" for p in pairs])
    negation = np.array([p.in_negation_set for p in pairs])
    headline = ~negation if (~negation).any() else negation

    answer_by_key = {}
    for p in pairs:
        answer_by_key.setdefault((p.image, p.question), p.answer)
    label_q = np.array([answer_by_key[k] == "yes" for k in keys])
    yes_unique = m_unique > 0
    label_p = np.array([p.expected_paraphrase == "yes" for p in pairs])

    groups: dict[str, bool] = {}
    for p, f, h in zip(pairs, flips, headline):
        if h:
            groups[p.group] = groups.get(p.group, False) | bool(f)

    group = np.array([p.group for p in pairs], dtype=object)
    head = _set_metrics(flips[headline], delta[headline], correct_p[headline], list(group[headline]), seed,
                        n_bootstrap)
    metrics = {
        "model": bundle.name,
        "headline": "meaning_preserving" if (~negation).any() else "negation",
        "n_pairs": head["n_pairs"],
        "n_questions": len(keys),
        "n_question_groups": len(groups),
        "accuracy": {"original": float((yes_unique == label_q).mean()), "paraphrase": head["accuracy_paraphrase"]},
        "n_correct": {"original": int((yes_unique == label_q).sum()), "paraphrase": head["n_correct_paraphrase"]},
        "n_flips": head["n_flips"],
        "flip_rate": head["flip_rate"],
        "flip_rate_ci": head["flip_rate_ci"],
        "flip_rate_ci_clustered": head["flip_rate_ci_clustered"],
        "flip_rate_design_effect": head["flip_rate_design_effect"],
        "near_tie": near_tie,
        "n_near_tie_flips": int(near[headline].sum()),
        "near_tie_flip_rate": float(near[headline].mean()),
        "question_flip_rate": sum(groups.values()) / len(groups),
        "margin_diff": head["margin_diff"],
        "margin_diff_ci": head["margin_diff_ci"],
        "negation": (_set_metrics(flips[negation], delta[negation], correct_p[negation], list(group[negation]),
                                  seed, n_bootstrap)
                     if negation.any() and (~negation).any() else None),
        "all": {"n_pairs": len(pairs), "n_flips": int(flips.sum()), "flip_rate": float(flips.mean())},
        "auc": stats.auc(m_unique, label_q),
        "auc_paraphrase": stats.auc(m_p[headline], label_p[headline]),
        "yes_rate": float(np.concatenate([yes_unique, yes_p[headline]]).mean()),
        "yes_rate_original": float(yes_unique.mean()),
        "label_yes_rate": float(np.concatenate([label_q, label_p[headline]]).mean()),
        "by_phenomenon": {},
    }
    metrics["flip_risk"] = flip_risk(m_q[headline], flips[headline], list(group[headline]), m_unique, label_q,
                                     risk=risk, seed=seed, n_bootstrap=n_bootstrap)
    for ph in sorted({p.phenomenon for p in pairs}):
        idx = np.array([p.phenomenon == ph for p in pairs])
        metrics["by_phenomenon"][ph] = {"n_pairs": int(idx.sum()), "flip_rate": float(flips[idx].mean()),
                                        "margin_diff": float(delta[idx].mean())}

    controls = set(CONTROLS if controls is True else [controls] if isinstance(controls, str) else controls or ())
    if controls - set(CONTROLS):
        raise MechmedError(f"controls {sorted(controls - set(CONTROLS))}: use some of {', '.join(CONTROLS)}")
    for name in ("blank_image_agreement", "swap_sensitivity", "counterfactual_sensitivity", "n_counterfactual",
                 "counterfactual_source", "quadrants", "quadrants_gray", "image_reliance"):
        metrics[name] = None
    reliant = gray = None
    if "blank" in controls and images:
        q_imgs = [images[key[0]] for key in keys]
        blank = run([key[1] for key in keys], [gray_like(im) for im in q_imgs], "blank images").numpy()
        metrics["blank_image_agreement"] = float(((blank > 0) == yes_unique).mean())
        changed = dict(zip(keys, (blank > 0) != yes_unique))
        gray = np.array([bool(changed[(p.image, p.question)]) for p in pairs], dtype=object)
        metrics["quadrants_gray"] = {"definition": "gray", **quadrant_counts(
            flips[headline], gray[headline].astype(bool), list(group[headline]))}
    if "counterfactual" in controls and images:
        cf = counterfactual_images(pairs, seed=seed)
        known = [k for k in keys if k in cf]
        if known:
            loaded = {path: images[path] if path in images else load_image(path) for path, _ in cf.values()}
            moved = run([k[1] for k in known], [loaded[cf[k][0]] for k in known], "counterfactual images",
                        rows=known).numpy()
            unique = dict(zip(keys, yes_unique))
            changed = {k: bool((m > 0) != unique[k]) for k, m in zip(known, moved)}
            metrics["counterfactual_sensitivity"] = float(np.mean(list(changed.values())))
            metrics["n_counterfactual"] = len(known)
            metrics["counterfactual_source"] = dict(sorted(Counter(cf[k][1] for k in known).items()))
            reliant = np.array([changed.get((p.image, p.question)) for p in pairs], dtype=object)
            has = headline & np.array([r is not None for r in reliant])
            metrics["quadrants"] = {"definition": "counterfactual", **quadrant_counts(
                flips[has], reliant[has].astype(bool), list(group[has]))}
    if reliant is not None and gray is not None:
        metrics["image_reliance"] = reliance_comparison(reliant[headline], gray[headline],
                                                        label_q_pairs(pairs)[headline],
                                                        [p.question for p, h in zip(pairs, headline) if h])
    if "swap" in controls and images:
        distinct = list(images)
        if len(distinct) >= 2:
            rng = np.random.default_rng(seed)
            swap_to = dict(zip(distinct, [distinct[j] for j in _derangement(len(distinct), rng)]))
            swapped = run([key[1] for key in keys], [images[swap_to[key[0]]] for key in keys],
                          "swapped images").numpy()
            metrics["swap_sensitivity"] = float(((swapped > 0) != yes_unique).mean())

    rows = [{
        "id": p.id, "question_id": p.question_id, "phenomenon": p.phenomenon, "answer": p.answer,
        "paraphrase_answer": p.expected_paraphrase, "negation_set": bool(n), "margin_question": float(mq),
        "margin_paraphrase": float(mp), "margin_diff": float(d), "flip": bool(f), "correct_paraphrase": bool(c),
        "near_tie": bool(t), "image_reliant": None if reliant is None else reliant[i],
        "image_reliant_gray": None if gray is None else gray[i],
        "question": p.question, "paraphrase": p.paraphrase, "image": None if p.image is None else str(p.image),
    } for i, (p, mq, mp, d, f, c, n, t) in enumerate(zip(pairs, m_q, m_p, delta, flips, correct_p, negation, near))]
    return Evaluation(metrics, rows)


def label_q_pairs(pairs: Sequence[ParaphrasePair]) -> np.ndarray:
    """Per pair, whether its question's expected answer is yes."""
    return np.array([p.answer == "yes" for p in pairs])


def counterfactual_images(pairs: Sequence[ParaphrasePair], seed: int = 0) -> dict:
    """Per question (image, question text), its counterfactual image and where it came from:
    ``(path, "given")`` from a pair's ``counterfactual_image``; else ``(path, "opposite_label")``, an
    image drawn (seeded) from those the set asks the same question of with the opposite expected
    answer. Questions with neither are left out."""
    out, answer = {}, {}
    for p in pairs:
        if p.image is None:
            continue
        key = (p.image, p.question)
        answer.setdefault(key, p.answer)
        if p.counterfactual_image is not None and key not in out:
            out[key] = (p.counterfactual_image, "given")
    by_text: dict = {}
    for (image, text), a in answer.items():
        by_text.setdefault((text, a), []).append(image)
    rng = np.random.default_rng([seed, 7])
    for key in sorted(answer, key=lambda k: (str(k[0]), k[1])):
        if key in out:
            continue
        options = sorted(by_text.get((key[1], "no" if answer[key] == "yes" else "yes"), []), key=str)
        if options:
            out[key] = (options[int(rng.integers(len(options)))], "opposite_label")
    return out


def _lookup_accuracy(values: np.ndarray, keys: Sequence) -> float:
    """How often a boolean equals the majority value of its key's cell."""
    cells: dict = {}
    for k, v in zip(keys, values):
        cells.setdefault(k, []).append(bool(v))
    return sum(max(sum(c), len(c) - sum(c)) for c in cells.values()) / len(values)


def reliance_comparison(reliant: np.ndarray, gray: np.ndarray, label_yes: np.ndarray, questions: Sequence) -> dict:
    """The counterfactual and the gray-image definitions of image reliance over the same pairs (those
    with both known): the share reliant under each, overall and per expected answer, the share of
    pairs on which they agree, and ``label_gain``: how much better the expected answer and the question
    text together predict a pair's reliance than the question text alone (the accuracy of a majority
    lookup per cell). A definition that measures the label within a question (a finding) has a large
    gain; pooled over questions, yes and no can look balanced by cancellation."""
    known = np.array([r is not None and g is not None for r, g in zip(reliant, gray)], bool)
    r, g, y = reliant[known].astype(bool), gray[known].astype(bool), np.asarray(label_yes, bool)[known]
    text = [q for q, k in zip(questions, known) if k]

    def shares(idx):
        n = int(idx.sum())
        return {"n_pairs": n, "counterfactual": float(r[idx].mean()) if n else None,
                "gray": float(g[idx].mean()) if n else None}

    def gain(x):
        return _lookup_accuracy(x, list(zip(text, y))) - _lookup_accuracy(x, text) if len(x) else None

    return {**shares(np.ones(len(r), bool)), "agreement": float((r == g).mean()) if len(r) else None,
            "label_gain": {"counterfactual": gain(r), "gray": gain(g)},
            "by_answer": {"yes": shares(y), "no": shares(~y)}}


def check_risk(risk) -> None:
    """A ``--risk`` is a tolerated error rate in [0, 1)."""
    if isinstance(risk, bool) or not (isinstance(risk, (int, float)) and 0 <= risk < 1):
        raise MechmedError(f"--risk {risk!r}: give the tolerated error rate as a fraction in [0, 1), e.g. 0.05")


def flip_risk(m_q, flips, groups, m_canonical, label_canonical, *, risk: float = RISK, seed: int = 0,
              n_bootstrap: int = 1000) -> dict:
    """Can the flips be foreseen from the original question's answer alone, and how well calibrated is it?

    - ``auroc_margin``: AUROC with which −|m_q| (a small margin on the original question) ranks the
      pairs that flip above those that do not, with a 95% interval from resampling questions
      (:func:`mechmed.stats.clustered_auc`). Over the two answer tokens the predictive entropy
      H(σ(m_q)) is a decreasing function of |m_q|, so it ranks the pairs the same way: this AUROC is
      also the entropy's.
    - ``ece``: expected calibration error of P(yes) = σ(m) on the canonical questions (10 bins).
    - ``coverage``: the largest share of canonical questions, answered in order of decreasing |m|,
      whose error rate is at most ``risk`` (:func:`mechmed.stats.coverage_at_risk`).
    """
    from mechmed import stats

    m_q, m_c = np.asarray(m_q, dtype=np.float64), np.asarray(m_canonical, dtype=np.float64)
    label = np.asarray(label_canonical, dtype=bool)
    roc = stats.clustered_auc(-np.abs(m_q), flips, groups, n_resamples=n_bootstrap, seed=seed)
    p_yes = 1.0 / (1.0 + np.exp(-m_c))
    return {"auroc_margin": roc["auc"], "auroc_margin_ci": roc["ci"], "n_pairs": roc["n"],
            "n_flips": roc["n_positive"], "n_questions": roc["n_clusters"],
            "ece": stats.expected_calibration_error(p_yes, label),
            "coverage": stats.coverage_at_risk(np.abs(m_c), (m_c > 0) == label, risk)}


def flip_risk_of_rows(rows: Sequence[dict], *, risk: float = RISK, seed: int = 0, n_bootstrap: int = 1000) -> dict:
    """:func:`flip_risk` from an evaluation's per-pair rows (``pairs.jsonl``): what ``evaluate`` reports,
    for runs written before it did, or pooled rows."""
    head = headline_rows(rows)
    canonical: dict = {}
    for r in rows:
        canonical.setdefault((r.get("image"), r["question"]), (r["margin_question"], r["answer"] == "yes"))
    m_c, label = (np.array(v) for v in zip(*canonical.values(), strict=True))
    return flip_risk([r["margin_question"] for r in head], [r["flip"] for r in head], [pair_group(r) for r in head],
                     m_c, label, risk=risk, seed=seed, n_bootstrap=n_bootstrap)


def headline_rows(rows: Sequence[dict]) -> list[dict]:
    """The per-pair rows (of :func:`evaluate`) that its headline metrics are over: the
    meaning-preserving pairs, or every pair when all are in the negation set."""
    kept = [r for r in rows if not r.get("negation_set")]
    return kept or list(rows)


def resolve_data(data: str, *, image_root=None, columns=None, seed: int = 0, cache_dir=None, split: str = "eval"):
    """A source's pairs by name (:func:`mechmed.sources.pairs_file`: ``demo`` is the embedded
    default's ``split`` set, ``demo:<set>`` one of its sets: ``eval``, ``train``, ``unseen``,
    ``negation``), a hub dataset (``hf:OWNER/NAME[:CONFIG][@SPLIT]``,
    :func:`mechmed.data.load_hub_pairs`), a JSONL/CSV file, or a directory."""
    from mechmed.data import load_hub_pairs, load_pairs
    from mechmed.data.loaders import parse_hub_data
    from mechmed.sources import pairs_file

    hub = parse_hub_data(data)
    if hub is not None:
        repo, config, hub_split = hub  # training pairs default to the dataset's train split, never its test split
        return load_hub_pairs(repo, config, hub_split or ("train" if split == "train" else None),
                              image_root=image_root, columns=columns)
    path = pairs_file(data, split=split, cache_dir=cache_dir, seed=seed)
    if path is not None:
        return load_pairs(path)
    return load_pairs(data, image_root=image_root, columns=columns)


def _read_run(path):
    from pathlib import Path

    from mechmed.io import read_json, read_jsonl

    path = Path(path)
    if not path.exists():
        raise MechmedError(f"evaluation {path}: not found; give a directory written by mechmed evaluate "
                           "(it holds metrics.json)")
    metrics = read_json(path / "metrics.json" if path.is_dir() else path, "evaluation")
    rows = []
    pf = (path if path.is_dir() else path.parent) / "pairs.jsonl"
    if pf.is_file():
        rows = read_jsonl(pf, "evaluation")
    for key in ("n_pairs", "n_flips", "n_correct", "n_questions"):
        if key not in metrics:
            raise MechmedError(f"evaluation {path}: metrics.json has no {key!r}; re-run mechmed evaluate")
    return metrics, rows


def compare_runs(a, b) -> dict:
    """Compare two evaluations (directories written by :func:`mechmed.stages.run_evaluate`), A = before, B = after.

    Flip rates and accuracies: two-proportion z-tests (independent samples, as the seed paper
    reports). When both runs share pair ids: exact McNemar on paired flips and a paired bootstrap
    of |Δmargin|. All of these are over the headline (meaning-preserving) pairs; ``negation``
    repeats the flip-rate tests over the negation set when both runs have one.
    """
    from mechmed import stats

    ma, ra = _read_run(a)
    mb, rb = _read_run(b)
    if ma.get("headline", "meaning_preserving") != mb.get("headline", "meaning_preserving"):
        raise MechmedError(f"compare {a} {b}: one reports its meaning-preserving pairs, the other its negation "
                           "set; compare evaluations of the same kind of pairs")
    out = {
        "a": str(a), "b": str(b),
        "flip_rate": stats.compare_proportions("flip_rate", ma["n_flips"], ma["n_pairs"], mb["n_flips"], mb["n_pairs"]),
        "accuracy_original": stats.compare_proportions(
            "accuracy_original", ma["n_correct"]["original"], ma["n_questions"],
            mb["n_correct"]["original"], mb["n_questions"]),
        "accuracy_paraphrase": stats.compare_proportions(
            "accuracy_paraphrase", ma["n_correct"]["paraphrase"], ma["n_pairs"],
            mb["n_correct"]["paraphrase"], mb["n_pairs"]),
        "margin_diff": {"a": ma.get("margin_diff"), "b": mb.get("margin_diff")},
        "paired": None,
        "negation": None,
    }
    out["paired"] = _paired(headline_rows(ra), headline_rows(rb))
    out["near_tie_flip_rate"] = {"a": ma.get("near_tie_flip_rate"), "b": mb.get("near_tie_flip_rate")}
    out["quadrants"] = _compare_quadrants(ma, mb, headline_rows(ra), headline_rows(rb))
    out["flip_risk"] = compare_flip_risk(headline_rows(ra), headline_rows(rb))
    if ma.get("negation") and mb.get("negation"):
        na, nb = ma["negation"], mb["negation"]
        out["negation"] = {
            "flip_rate": stats.compare_proportions("negation_flip_rate", na["n_flips"], na["n_pairs"],
                                                   nb["n_flips"], nb["n_pairs"]),
            "paired": _paired([r for r in ra if r.get("negation_set")], [r for r in rb if r.get("negation_set")]),
        }
    return out


def compare_flip_risk(rows_a: Sequence[dict], rows_b: Sequence[dict], seed: int = 0,
                      n_bootstrap: int = 2000) -> dict | None:
    """Does B foresee its flips from |margin| better or worse than A? The AUROC of each over the pairs
    both evaluated, and B − A with its interval and p from resampling questions once for both
    (:func:`mechmed.stats.paired_clustered_auc`); None without shared pair ids."""
    from mechmed import stats

    a, b = {r["id"]: r for r in rows_a}, {r["id"]: r for r in rows_b}
    common = [i for i in a if i in b]
    if not common:
        return None
    score = [[-abs(d[i]["margin_question"]) for i in common] for d in (a, b)]
    flips = [[d[i]["flip"] for i in common] for d in (a, b)]
    return {"n_common_pairs": len(common),
            **stats.paired_clustered_auc(score[0], flips[0], score[1], flips[1], pair_clusters(a, common),
                                         n_resamples=n_bootstrap, seed=seed)}


RELIANCE_WORDS = {
    "counterfactual": "the question's answer changes if the image is replaced by one whose answer is the "
                      "opposite (the same patient with the asked finding toggled, or another image with the "
                      "opposite label)",
    "gray": "the question's answer changes if the image is replaced by uniform gray",
}
"""What "image-reliant" means under each definition, for captions and sentences."""
#: The per-pair reliance field behind each quadrants entry of the metrics (``quadrants``' rows are
#: counterfactual, or gray in results written before the counterfactual control).
QUADRANT_FIELDS = {"quadrants": "image_reliant", "quadrants_gray": "image_reliant_gray"}


def quadrant_of(row: dict, key: str = "image_reliant") -> str:
    """The quadrant of one per-pair row (with ``flip`` and the reliance field ``key``)."""
    return ("flipped" if row["flip"] else "consistent") + ("_reliant" if row[key] else "_blind")


def quadrant_mcnemar(a: dict, b: dict, clustered: bool = False, by_seed: bool = False,
                     key: str = "image_reliant") -> dict:
    """Per quadrant, the exact McNemar p of membership over the pair ids ``a`` and ``b`` (per-pair
    rows by id) share with a known image reliance (the field ``key``): did pairs move into or out of
    that cell? ``clustered``: McNemar clustered by question (:func:`mechmed.stats.mcnemar_clustered`);
    a question's pairs share its image reliance. ``by_seed``: ids are ``seed:id`` and each seed's
    questions are their own (the demo builds its data per seed)."""
    common = [i for i in a if i in b and a[i].get(key) is not None and b[i].get(key) is not None]
    return {name: (paired_test([quadrant_of(a[i], key) == name for i in common],
                               [quadrant_of(b[i], key) == name for i in common],
                               pair_clusters(a, common, by_seed) if clustered else None) if common else None)
            for name in QUADRANTS}


def pair_clusters(rows: dict, ids: Sequence[str], by_seed: bool = False) -> list[str]:
    """The question (:func:`pair_group`) of each id; ``by_seed``: of its seed (ids ``seed:id``)."""
    return [(i.split(":", 1)[0] + "|" if by_seed else "") + pair_group(rows[i]) for i in ids]


def paired_test(before, after, clusters: Sequence | None = None) -> float:
    """p of exact McNemar on paired booleans, or with ``clusters`` McNemar clustered by them."""
    from mechmed import stats

    if clusters is None:
        return float(stats.mcnemar_from_pairs(before, after).p_value)
    return float(stats.mcnemar_clustered(before, after, clusters).p_value)


def paired_flips(a: dict, b: dict, clustered: bool = False, by_seed: bool = False) -> float | None:
    """:func:`paired_test` of the per-pair flips over the pair ids ``a`` and ``b`` share (None: none)."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    return paired_test([a[i]["flip"] for i in common], [b[i]["flip"] for i in common],
                       pair_clusters(a, common, by_seed) if clustered else None)


def quadrant_definition(quadrants: dict) -> str:
    """Which image reliance a ``quadrants`` dict is over (results written before the counterfactual
    control have the gray-image one)."""
    return quadrants.get("definition", "gray")


def _compare_quadrants(ma: dict, mb: dict, ra: Sequence[dict], rb: Sequence[dict]) -> dict | None:
    """Both runs' quadrant shares and, per quadrant, :func:`quadrant_mcnemar` over the pairs both
    share; None unless both ran a control with the same definition of image reliance (the
    counterfactual one where both have it, else the gray image)."""
    def by_definition(m):
        return {quadrant_definition(m[name]): name for name in ("quadrants_gray", "quadrants") if m.get(name)}

    da, db = by_definition(ma), by_definition(mb)
    definition = next((d for d in ("counterfactual", "gray") if d in da and d in db), None)
    if definition is None:
        return None
    ia, ib = {r["id"]: r for r in ra}, {r["id"]: r for r in rb}
    # the rows keep each run's own field for that definition (``image_reliant`` held the gray one before 0.9.0)
    key_a, key_b = QUADRANT_FIELDS[da[definition]], QUADRANT_FIELDS[db[definition]]
    ia = {i: {**r, "reliant": r.get(key_a)} for i, r in ia.items()}
    ib = {i: {**r, "reliant": r.get(key_b)} for i, r in ib.items()}
    n = sum(1 for i in ia if i in ib and ia[i]["reliant"] is not None and ib[i]["reliant"] is not None)
    return {"a": ma[da[definition]], "b": mb[db[definition]], "definition": definition, "n_common_pairs": n,
            "p": quadrant_mcnemar(ia, ib, key="reliant"),
            "p_clustered": quadrant_mcnemar(ia, ib, clustered=True, key="reliant")}


def _paired(ra: Sequence[dict], rb: Sequence[dict]) -> dict | None:
    """Exact McNemar on the flips and a paired bootstrap of |Δmargin| over the pair ids both share."""
    from mechmed import stats

    ia = {r["id"]: r for r in ra}
    ib = {r["id"]: r for r in rb}
    common = [i for i in ia if i in ib]
    if not common:
        return None
    fa = np.array([ia[i]["flip"] for i in common], bool)
    fb = np.array([ib[i]["flip"] for i in common], bool)
    da = np.array([ia[i]["margin_diff"] for i in common], float)
    db = np.array([ib[i]["margin_diff"] for i in common], float)
    return {
        "n_common_pairs": len(common),
        "mcnemar_flips": stats.mcnemar_from_pairs(fa, fb).to_dict(),
        "mcnemar_flips_clustered": stats.mcnemar_clustered(fa, fb, pair_clusters(ia, common)).to_dict(),
        "n_common_questions": len(set(pair_clusters(ia, common))),
        "margin_diff_bootstrap": stats.paired_bootstrap(da, db).to_dict(),
    }
