"""Question phrasings for the six synthetic findings, and a text corpus that uses their words.

For each finding, :func:`questions` lists one canonical question and its paraphrases, grouped by
the PSF-Med phenomena (``lexical_substitution``, ``syntactic_restructuring``, ``formality``,
``scope``, ``specificity``, ``negation_pattern``). The embedded model trains mostly on the
canonical phrasing and a few training paraphrases (``split == "train"``); the held-out phrasings
(``split == "heldout"``) use other verbs, nouns and word order and make up the evaluation set, so the
model is paraphrase-sensitive on them. A negated phrasing (``negated=True``) asks the opposite
question: its expected answer is the opposite of the canonical one. Negations are held out except
one per finding in training ("Is X absent?"), whose flipped answer is unambiguous.

:func:`corpus` is report-like and definitional text that contains every word of every held-out
phrasing, never as a question with an answer, so a held-out word has a trained embedding and the
model's sensitivity comes from phrasing rather than from unseen words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mechmed.demo.images import FINDINGS

ANSWER_WORDS = ("yes", "no")
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Phrasing:
    """One full yes/no question about one finding."""

    text: str
    phenomenon: str
    negated: bool
    split: str  # "train" or "heldout"


def _p(text: str, phenomenon: str, split: str = "heldout", negated: bool = False) -> Phrasing:
    return Phrasing(text=text, phenomenon=phenomenon, negated=negated, split=split)


_CANON = "canonical"
_LEX, _SYN, _FORM = "lexical_substitution", "syntactic_restructuring", "formality"
_SCOPE, _SPEC, _NEG = "scope", "specificity", "negation_pattern"

# Index 0 is the canonical phrasing; then training paraphrases; then held-out ones.
_QUESTIONS: dict[str, tuple[Phrasing, ...]] = {
    "effusion": (
        _p("Is there a pleural effusion?", _CANON, "train"),
        _p("Is pleural fluid present?", _LEX, "train"),
        _p("Does the image show a pleural effusion?", _SYN, "train"),
        _p("Is pleural effusion absent?", _NEG, "train", negated=True),
        _p("Is there fluid in the pleural space?", _LEX),
        _p("Does this radiograph demonstrate a pleural effusion?", _SYN),
        _p("Can a pleural effusion be seen on this film?", _SYN),
        _p("Can you see any fluid around the lungs here?", _FORM),
        _p("Would you say this patient has a pleural effusion?", _FORM),
        _p("Is there an effusion at either lung base?", _SCOPE),
        _p("Is either costophrenic angle blunted by fluid?", _SPEC),
        _p("Is the image free of pleural effusion?", _NEG, negated=True),
        _p("Can a pleural effusion be excluded?", _NEG, negated=True),
    ),
    "cardiomegaly": (
        _p("Is there cardiomegaly?", _CANON, "train"),
        _p("Is the heart enlarged?", _LEX, "train"),
        _p("Does the image show cardiomegaly?", _SYN, "train"),
        _p("Is cardiomegaly absent?", _NEG, "train", negated=True),
        _p("Is the cardiac silhouette widened?", _LEX),
        _p("Does this radiograph demonstrate enlargement of the heart?", _SYN),
        _p("Can cardiomegaly be seen on this film?", _SYN),
        _p("Does the heart look big to you?", _FORM),
        _p("Is the heart wider than half of the chest?", _SPEC),
        _p("Is the cardiothoracic ratio increased?", _SPEC),
        _p("Is the image free of cardiomegaly?", _NEG, negated=True),
        _p("Is the heart size normal?", _NEG, negated=True),
    ),
    "pneumothorax": (
        _p("Is there a pneumothorax?", _CANON, "train"),
        _p("Is there a collapsed lung?", _LEX, "train"),
        _p("Does the image show a pneumothorax?", _SYN, "train"),
        _p("Is pneumothorax absent?", _NEG, "train", negated=True),
        _p("Is there air in the pleural space?", _LEX),
        _p("Does this radiograph demonstrate a pneumothorax?", _SYN),
        _p("Can a pneumothorax be seen on this film?", _SYN),
        _p("Any sign of a dropped lung on this one?", _FORM),
        _p("Is a visceral pleural line visible with no lung markings beyond it?", _SPEC),
        _p("Is there a pneumothorax on either side?", _SCOPE),
        _p("Is the image free of pneumothorax?", _NEG, negated=True),
        _p("Are both lungs fully expanded?", _NEG, negated=True),
    ),
    "nodule": (
        _p("Is there a pulmonary nodule?", _CANON, "train"),
        _p("Is there a lung nodule?", _LEX, "train"),
        _p("Does the image show a pulmonary nodule?", _SYN, "train"),
        _p("Is a pulmonary nodule absent?", _NEG, "train", negated=True),
        _p("Is there a round density in the lung?", _LEX),
        _p("Does this radiograph demonstrate a pulmonary nodule?", _SYN),
        _p("Can a nodule be seen on this film?", _SYN),
        _p("Do you see a spot on the lung here?", _FORM),
        _p("Is there a well-circumscribed nodule in the lung parenchyma?", _SPEC),
        _p("Is there a nodule in either lung?", _SCOPE),
        _p("Is the image free of pulmonary nodules?", _NEG, negated=True),
        _p("Are the lungs clear of any nodule?", _NEG, negated=True),
    ),
    "consolidation": (
        _p("Is there consolidation?", _CANON, "train"),
        _p("Is there airspace consolidation?", _LEX, "train"),
        _p("Does the image show consolidation?", _SYN, "train"),
        _p("Is consolidation absent?", _NEG, "train", negated=True),
        _p("Is there lobar opacification?", _LEX),
        _p("Does this radiograph demonstrate consolidation?", _SYN),
        _p("Can consolidation be seen on this film?", _SYN),
        _p("Do you see a patchy white area in one of the lobes?", _FORM),
        _p("Is there a focal airspace opacity confined to one lobe?", _SPEC),
        _p("Is there consolidation in any lobe?", _SCOPE),
        _p("Is the image free of consolidation?", _NEG, negated=True),
        _p("Are all lobes clear of consolidation?", _NEG, negated=True),
    ),
    "edema": (
        _p("Is there pulmonary edema?", _CANON, "train"),
        _p("Is there pulmonary congestion?", _LEX, "train"),
        _p("Does the image show pulmonary edema?", _SYN, "train"),
        _p("Is pulmonary edema absent?", _NEG, "train", negated=True),
        _p("Is there pulmonary oedema?", _LEX),
        _p("Does this radiograph demonstrate pulmonary edema?", _SYN),
        _p("Can pulmonary edema be seen on this film?", _SYN),
        _p("Do the lungs look wet to you?", _FORM),
        _p("Is there bilateral perihilar haziness?", _SPEC),
        _p("Is there edema throughout both lungs?", _SCOPE),
        _p("Is the image free of pulmonary edema?", _NEG, negated=True),
        _p("Can pulmonary edema be excluded?", _NEG, negated=True),
    ),
}


def _check(finding: str) -> str:
    if finding not in _QUESTIONS:
        raise ValueError(f"unknown finding {finding!r}; use one of {FINDINGS}")
    return finding


def questions(finding: str) -> list[Phrasing]:
    """All phrasings of ``finding``'s question: index 0 is the canonical one."""
    return list(_QUESTIONS[_check(finding)])


def canonical(finding: str) -> str:
    """The canonical question, e.g. ``"Is there a pleural effusion?"``."""
    return _QUESTIONS[_check(finding)][0].text


def train_phrasings(finding: str) -> list[Phrasing]:
    """The phrasings the model trains on (the canonical one first)."""
    return [p for p in questions(finding) if p.split == "train"]


def heldout_phrasings(finding: str) -> list[Phrasing]:
    """The phrasings the model never trains on: the evaluation paraphrases."""
    return [p for p in questions(finding) if p.split == "heldout"]


# ----------------------------------------------------------------------------- corpus

# Definitions and descriptions: declarative sentences, no questions and no answers.
_DEFINITIONS: dict[str, tuple[str, ...]] = {
    "effusion": (
        "Pleural fluid means pleural effusion.",
        "A pleural effusion is fluid in the pleural space around the lung.",
        "Fluid around the lungs collects at a lung base when the patient is upright.",
        "On a frontal chest radiograph an effusion is seen as a white area at either lung base.",
        "The top of an effusion forms a meniscus that rises along the chest wall.",
        "A small effusion is blunting the costophrenic angle.",
        "A blunted costophrenic angle is a sign of pleural fluid.",
        "When both costophrenic angles are sharp, a pleural effusion can be excluded.",
        "An image free of pleural effusion shows clear costophrenic angles.",
        "The radiologist would say the patient has an effusion when fluid fills the lung base.",
        "This film demonstrates how pleural fluid looks on a radiograph.",
    ),
    "cardiomegaly": (
        "Cardiomegaly means enlargement of the heart.",
        "An enlarged heart is called cardiomegaly.",
        "The cardiac silhouette is the outline of the heart on a chest film.",
        "A widened cardiac silhouette is a sign of cardiomegaly.",
        "The cardiothoracic ratio is the width of the heart divided by the width of the chest.",
        "A cardiothoracic ratio increased above one half suggests cardiomegaly.",
        "When the heart is wider than half of the chest, the heart is big.",
        "A normal heart size makes cardiomegaly unlikely, and an image free of cardiomegaly shows a heart size that is normal.",
        "To the radiologist the heart may look big on a portable film.",
    ),
    "pneumothorax": (
        "A pneumothorax is air in the pleural space.",
        "A collapsed lung or dropped lung is the informal name for a pneumothorax.",
        "In a pneumothorax the visceral pleural line is visible with no lung markings beyond it.",
        "Lung markings are the vessels seen in the lung.",
        "A pneumothorax may occur on either side.",
        "When both lungs are fully expanded, a pneumothorax can be excluded.",
        "An image free of pneumothorax shows lung markings out to the chest wall.",
        "Any sign of a pneumothorax on a radiograph needs attention, and this one is urgent.",
    ),
    "nodule": (
        "A pulmonary nodule is a small round density in the lung.",
        "A lung nodule is a well-circumscribed spot in the lung parenchyma.",
        "The lung parenchyma is the tissue of the lung.",
        "A nodule may appear in either lung.",
        "Pulmonary nodules are usually round and white on a radiograph.",
        "Lungs clear of any nodule show only vessels and ribs.",
        "An image free of pulmonary nodules can still show other findings.",
        "Patients often say they see a spot on the lung here on the film.",
    ),
    "consolidation": (
        "Consolidation means airspace filled with fluid or pus instead of air.",
        "Airspace consolidation in one lobe is called lobar opacification.",
        "Consolidation is a focal airspace opacity, often confined to one lobe.",
        "On a radiograph consolidation looks like a patchy white area in one of the lobes.",
        "Consolidation in any lobe can be a sign of pneumonia.",
        "When all lobes are clear of consolidation, the lungs look dark.",
        "An image free of consolidation has no focal opacity.",
    ),
    "edema": (
        "Pulmonary edema means fluid in the lung tissue.",
        "Oedema is the British spelling of edema, so pulmonary oedema is pulmonary edema.",
        "Pulmonary congestion often comes before pulmonary edema.",
        "Pulmonary edema causes bilateral perihilar haziness.",
        "Perihilar haziness is a diffuse haze around the hila of both lungs.",
        "Edema throughout both lungs makes the lungs look wet to the radiologist.",
        "Pulmonary edema can be excluded when both lungs are clear.",
        "An image free of pulmonary edema has sharp vessels.",
    ),
}

_GENERAL = (
    "A chest radiograph is also called a chest film or a chest x-ray.",
    "This radiograph is a frontal view of the chest.",
    "The lungs look dark because they are full of air.",
    "The heart, the spine and pleural fluid look white on the film.",
    "The radiologist reads the image and writes a report.",
    "You can see the heart between the lungs.",
    "Each lung has an upper lobe and a lower lobe in these images.",
    "Radiographs demonstrate dense tissue as white and air as dark.",
    "Small findings do not always show on a chest film, and a normal film does not exclude every finding.",
)

_HEADERS = (
    "Frontal chest radiograph.",
    "PA chest film.",
    "Chest x-ray, frontal view.",
    "Single frontal view of the chest.",
    "Portable chest radiograph.",
)

_SIDES = ("left", "right")
_SIZES = ("small", "moderate", "large")

# Report sentences per finding: (when present, when absent). "{side}" and "{size}" are filled in.
_REPORT: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "effusion": (
        (
            "{Size} {side} pleural effusion.",
            "There is a {size} {side} pleural effusion.",
            "Fluid in the {side} pleural space is blunting the costophrenic angle.",
            "The {side} costophrenic angle is blunted by a {size} effusion.",
            "The film demonstrates a {side} effusion at the lung base.",
        ),
        (
            "No pleural effusion.",
            "The costophrenic angles are sharp.",
            "No fluid is seen around the lungs.",
            "A pleural effusion is excluded.",
        ),
    ),
    "cardiomegaly": (
        (
            "The heart is enlarged.",
            "Cardiomegaly.",
            "The cardiac silhouette is widened, consistent with cardiomegaly.",
            "The heart is wider than half of the chest.",
            "The cardiothoracic ratio is increased.",
        ),
        (
            "Heart size is normal.",
            "The cardiac silhouette is normal.",
            "No cardiomegaly.",
            "The cardiothoracic ratio is normal.",
        ),
    ),
    "pneumothorax": (
        (
            "{Size} {side} pneumothorax.",
            "There is a {side} pneumothorax with a collapsed lung.",
            "A visceral pleural line is visible in the {side} apex, with no lung markings beyond it.",
            "Air is seen in the {side} pleural space.",
        ),
        (
            "No pneumothorax.",
            "Both lungs are fully expanded.",
            "Lung markings extend to the chest wall on both sides.",
            "There is no pneumothorax on either side.",
        ),
    ),
    "nodule": (
        (
            "A {side} pulmonary nodule is noted.",
            "There is a round nodule in the {side} lung.",
            "A well-circumscribed {side} lung nodule.",
            "A small round density projects over the {side} lung.",
        ),
        ("No pulmonary nodule.", "No nodule is seen in either lung.", "The lungs are clear of nodules."),
    ),
    "consolidation": (
        (
            "{Side} {lobe} lobe consolidation.",
            "There is patchy consolidation in the {side} {lobe} lobe.",
            "Focal airspace opacity in the {side} {lobe} lobe, consistent with consolidation.",
            "Lobar opacification of the {side} {lobe} lobe.",
        ),
        ("No consolidation.", "No focal airspace opacity.", "All lobes are clear."),
    ),
    "edema": (
        (
            "Pulmonary edema.",
            "There is bilateral perihilar haziness, consistent with pulmonary edema.",
            "Diffuse haze throughout both lungs, in keeping with edema.",
            "Pulmonary congestion with edema.",
        ),
        ("No pulmonary edema.", "The lungs are clear.", "No pulmonary congestion.", "The vessels are sharp."),
    ),
}

_IMPRESSION_NORMAL = ("Impression: normal chest.", "No acute findings.", "Normal chest radiograph.")


def _rng(rng_or_seed: np.random.Generator | int) -> np.random.Generator:
    if isinstance(rng_or_seed, np.random.Generator):
        return rng_or_seed
    return np.random.default_rng(rng_or_seed)


def _pick(rng: np.random.Generator, options: tuple[str, ...]) -> str:
    return options[int(rng.integers(len(options)))]


def report(findings: dict[str, bool], rng: np.random.Generator | int) -> str:
    """A short radiology report describing ``findings`` (one sentence per finding), for captioning."""
    rng = _rng(rng)
    parts = [_pick(rng, _HEADERS)]
    for f in FINDINGS:
        present, absent = _REPORT[f]
        side, size, lobe = _pick(rng, _SIDES), _pick(rng, _SIZES), _pick(rng, ("upper", "lower"))
        text = _pick(rng, present if findings.get(f) else absent)
        parts.append(
            text.format(side=side, Side=side.capitalize(), size=size, Size=size.capitalize(), lobe=lobe)
        )
    if not any(findings.get(f) for f in FINDINGS):
        parts.append(_pick(rng, _IMPRESSION_NORMAL))
    return " ".join(parts)


def definitions() -> list[str]:
    """Every definitional sentence of the corpus (fixed order)."""
    return [*_GENERAL, *(s for f in FINDINGS for s in _DEFINITIONS[f])]


def corpus(rng_or_seed: np.random.Generator | int = 0, n_reports: int = 300) -> list[str]:
    """Report-like and definitional text using every held-out word, with no questions in it.

    The definitions come first (each once), then ``n_reports`` reports of random findings.
    """
    rng = _rng(rng_or_seed)
    out = definitions()
    for _ in range(n_reports):
        findings = {f: bool(rng.random() < 0.3) for f in FINDINGS}
        out.append(report(findings, rng))
    return out


_WORD_RE = re.compile(r"[a-z0-9\-']+")


def vocabulary(texts: str | Iterable[str]) -> set[str]:
    """Lower-cased words of ``texts``, punctuation stripped (split as the tiny tokenizer splits words)."""
    if isinstance(texts, str):
        texts = [texts]
    return {w for t in texts for w in _WORD_RE.findall(t.lower())}
