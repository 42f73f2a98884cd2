"""Shortcut audit of a pair file: how much of its answers can be had without the image?

Before a flip rate or an accuracy on a benchmark is trusted, two things are worth knowing (FlipLens
found that in a PadChest flip bank the finding's name alone scored 100%):

- **answer balance per group** (a group is the finding the question asks about: ``extra.finding``,
  else ``extra.question_type``, else the question text): a group whose answers are all yes (or all
  no) is answered by its name;
- **a text-only lookup**: each phrasing (question or paraphrase) is answered with the majority answer
  that the same text has in the other folds (5 folds by question, so a question and its paraphrases
  are never split and nothing is memorised), else the group's majority there, else the overall one.
  Its accuracy, and the group-name lookup's, say how far text alone gets; above ``threshold`` the
  audit warns.

With a model (``mechmed audit-data --model``) it adds the model's accuracy on the canonical questions
with the image replaced by a uniform gray one (:func:`mechmed.readout.gray_like`): what the model
answers from the text alone.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np

from mechmed.data import ParaphrasePair
from mechmed.errors import MechmedError

log = logging.getLogger(__name__)

#: Text-only accuracy above which the audit warns that the benchmark measures the text.
THRESHOLD = 0.8
FOLDS = 5


def group_of(p: ParaphrasePair) -> str:
    """What a question asks about: ``extra.finding``, else ``extra.question_type``, else its text."""
    extra = p.extra or {}
    return str(extra.get("finding") or extra.get("question_type") or _norm(p.question))


def _norm(text: str) -> str:
    return " ".join(text.lower().replace("?", " ").split())


def _majority(counts: Counter) -> str | None:
    """The most frequent answer; None on a tie or no answers."""
    top = counts.most_common(2)
    if not top or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def text_items(pairs: Sequence[ParaphrasePair]) -> list[tuple[str, str, str, str]]:
    """(question id, phrasing, group, expected answer) of each distinct phrasing of each question (a
    question: its ``question_id``, else image and text): the question once, every paraphrase with its
    expected answer."""
    seen, out = set(), []
    for p in pairs:
        for text, answer in ((p.question, p.answer), (p.paraphrase, p.expected_paraphrase)):
            key = (p.group, text)
            if key not in seen:
                seen.add(key)
                out.append((p.group, _norm(text), group_of(p), answer))
    return out


def text_lookup_accuracy(items, folds: int = FOLDS, seed: int = 0) -> dict:
    """Accuracy of answering each phrasing from the other folds (folds by question): the majority
    answer of the same text there, else of its group, else overall. Also the group-name lookup alone."""
    if not items:
        raise MechmedError("audit: no pairs; give a pair file with rows")
    questions = sorted({q for q, *_ in items})
    rng = np.random.default_rng(seed)
    fold_of = dict(zip(questions, rng.permutation(len(questions)) % max(1, min(folds, len(questions))),
                       strict=True))
    n_folds = max(fold_of.values()) + 1
    right_text = right_group = by_text = 0
    for k in range(n_folds):
        train = [it for it in items if fold_of[it[0]] != k]
        by_t, by_g, overall = defaultdict(Counter), defaultdict(Counter), Counter()
        for _, text, group, answer in train:
            by_t[text][answer] += 1
            by_g[group][answer] += 1
            overall[answer] += 1
        fallback = _majority(overall) or "yes"
        for _, text, group, answer in (it for it in items if fold_of[it[0]] == k):
            g = _majority(by_g[group]) or fallback
            t = _majority(by_t[text])
            by_text += t is not None
            right_text += (t or g) == answer
            right_group += g == answer
    n = len(items)
    return {"n_phrasings": n, "n_questions": len(questions), "folds": n_folds,
            "text_lookup_accuracy": right_text / n, "group_lookup_accuracy": right_group / n,
            "share_answered_by_text": by_text / n}


def answer_balance(pairs: Sequence[ParaphrasePair]) -> list[dict]:
    """Per group: its canonical questions, their share of yes, and whether one answer is all there is
    (in a group of two questions or more)."""
    per: dict = defaultdict(dict)
    for p in pairs:
        per[group_of(p)][p.group] = p.answer
    rows = []
    for group, answers in sorted(per.items()):
        yes = sum(a == "yes" for a in answers.values())
        rows.append({"group": group, "n_questions": len(answers), "yes_share": yes / len(answers),
                     "one_answer": len(answers) > 1 and yes in (0, len(answers))})
    return rows


def audit_pairs(pairs: Sequence[ParaphrasePair], *, threshold: float = THRESHOLD, folds: int = FOLDS,
                seed: int = 0) -> dict:
    """The data-only audit (see the module doc): ``balance`` per group, the lookups' accuracies,
    ``majority_accuracy`` (always the overall majority answer) and ``warning`` (None when text alone
    stays at or below ``threshold``)."""
    if not 0 < threshold <= 1:
        raise MechmedError(f"--threshold {threshold!r}: give an accuracy in (0, 1], e.g. 0.8")
    items = text_items(pairs)
    look = text_lookup_accuracy(items, folds=folds, seed=seed)
    overall = Counter(answer for *_, answer in items)
    balance = answer_balance(pairs)
    out = {**look, "majority_accuracy": max(overall.values()) / len(items), "threshold": threshold,
           "n_groups": len(balance), "groups_with_one_answer": [b["group"] for b in balance if b["one_answer"]],
           "balance": balance, "warning": None}
    best = max(look["text_lookup_accuracy"], look["group_lookup_accuracy"])
    if best > threshold:
        which = "the group's name" if look["group_lookup_accuracy"] >= look["text_lookup_accuracy"] else "the text"
        out["warning"] = (f"{which} alone answers {best:.0%} of the phrasings (above {threshold:.0%}; always "
                          f"answering the majority gets {out['majority_accuracy']:.0%}): this set measures the text "
                          "as much as the image")
    return out


def blind_accuracy(bundle, pairs: Sequence[ParaphrasePair], batch_size: int = 16) -> dict | None:
    """The model's accuracy on the canonical questions with each image replaced by a uniform gray one,
    beside its accuracy with the image; None for pairs without images."""
    from mechmed.readout import gray_like, margins, pair_images

    canonical = list({(p.image, p.question): p for p in pairs}.values())
    images = pair_images(canonical)
    if images is None or not bundle.multimodal:
        return None
    label = np.array([p.answer == "yes" for p in canonical])
    questions = [p.question for p in canonical]
    with_image = margins(bundle, questions, images, batch_size=batch_size).numpy() > 0
    gray = margins(bundle, questions, [gray_like(im) for im in images], batch_size=batch_size).numpy() > 0
    return {"n_questions": len(canonical), "accuracy": float((with_image == label).mean()),
            "accuracy_gray_image": float((gray == label).mean())}
