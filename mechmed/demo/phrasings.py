"""Question phrasings for the six synthetic findings, and a text corpus that uses their words.

Two kinds of phrasing, kept apart:

* **Base phrasings** (:func:`base_phrasings`): the canonical question ("Is there a pleural
  effusion?") and three fixed rewordings per finding. The embedded model's answers are trained on
  these alone, so it stays narrow and paraphrase-sensitive.
* **Compositional paraphrases**, as PSF-Med builds them: a *wrapper* (a question frame such as
  ``"Does this radiograph demonstrate {}?"``, grouped by PSF-Med phenomenon) filled with a *term*
  for the finding (``"fluid in the pleural space"``). Wrappers are shared by all findings, each
  phenomenon has several, and each finding has several terms (:data:`TERMS`).

The wrappers come in three pools (:data:`WRAPPERS`):

``shared``
    Meaning-preserving wrappers of every phenomenon. Their (wrapper, finding) combinations are
    split like a checkerboard (:func:`combination_split`): half are for fine-tuning
    (``"train"``), the other half for evaluation (``"eval"``), so an evaluation pair's wrapper was
    fine-tuned on other findings, its finding with other wrappers, never the two together.
``unseen``
    Meaning-preserving wrappers never fine-tuned with any finding: the hard case, reported beside.
``negation``
    Answer-inverting wrappers ("Is the image free of {}?"): an operator, not a paraphrase, so their
    pairs form their own set, with the opposite expected answer.

:func:`corpus` is report-like and definitional text that contains every word of every phrasing,
never as a question with an answer, so every word has a trained embedding and the model's
sensitivity comes from phrasing rather than from unseen words.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from mechmed.demo.images import FINDINGS

ANSWER_WORDS = ("yes", "no")
#: The sets a phrasing belongs to: ``base`` (the model's own training phrasings), ``train`` and
#: ``eval`` (the two halves of the shared wrappers' combinations), ``unseen`` and ``negation``.
SPLITS = ("base", "train", "eval", "unseen", "negation")
POOLS = ("shared", "unseen", "negation")

_CANON = "canonical"
_LEX, _SYN, _FORM = "lexical_substitution", "syntactic_restructuring", "formality"
_SCOPE, _SPEC, _NEG = "scope", "specificity", "negation_pattern"
#: The meaning-preserving phenomena of the shared and unseen wrappers.
PHENOMENA = (_SYN, _FORM, _SCOPE, _SPEC, _LEX)


@dataclass(frozen=True)
class Phrasing:
    """One full yes/no question about one finding."""

    text: str
    phenomenon: str
    negated: bool
    split: str  # one of SPLITS
    wrapper: str = ""  # the wrapper template ("" for base phrasings)
    term: int = -1  # index into TERMS[finding] (-1 for base phrasings)


@dataclass(frozen=True)
class Wrapper:
    """A question frame with one ``{}`` for a finding's term."""

    template: str
    phenomenon: str
    pool: str  # one of POOLS

    @property
    def negated(self) -> bool:
        return self.pool == "negation"

    def fill(self, term: str) -> str:
        text = self.template.format(term)
        return text[0].upper() + text[1:]


#: Terms per finding (noun phrases that fit every wrapper); index 0 is the canonical question's.
TERMS: dict[str, tuple[str, ...]] = {
    "effusion": ("a pleural effusion", "pleural fluid", "fluid in the pleural space", "fluid around the lungs"),
    "cardiomegaly": ("cardiomegaly", "an enlarged heart", "a widened cardiac silhouette", "enlargement of the heart"),
    "pneumothorax": ("a pneumothorax", "a collapsed lung", "air in the pleural space", "a dropped lung"),
    "nodule": ("a pulmonary nodule", "a lung nodule", "a round density in the lung", "a spot on the lung"),
    "consolidation": ("consolidation", "airspace consolidation", "lobar opacification", "a focal airspace opacity"),
    "edema": ("pulmonary edema", "pulmonary congestion", "pulmonary oedema", "bilateral perihilar haziness"),
}


def _w(template: str, phenomenon: str, pool: str = "shared") -> Wrapper:
    return Wrapper(template, phenomenon, pool)


WRAPPERS: tuple[Wrapper, ...] = (
    # syntactic restructuring
    _w("Can {} be seen on this film?", _SYN),
    _w("Does this radiograph demonstrate {}?", _SYN),
    _w("Is {} seen on this image?", _SYN),
    _w("Is {} present on this radiograph?", _SYN),
    _w("Has {} been found on this image?", _SYN),
    _w("On this film, is {} seen?", _SYN, "unseen"),
    # formality
    _w("Would you say this patient has {}?", _FORM),
    _w("Do you see {} here?", _FORM),
    _w("Any sign of {} on this one?", _FORM),
    _w("Can you spot {} on this picture?", _FORM),
    _w("Could there be {} here?", _FORM),
    _w("Do you think there is {} here?", _FORM, "unseen"),
    # scope
    _w("Is there {} on either side?", _SCOPE),
    _w("Is there {} anywhere in the chest?", _SCOPE),
    _w("Is there {} on the left or the right?", _SCOPE),
    _w("Is there {} in this whole chest?", _SCOPE),
    _w("Is there {} at either lung base or apex?", _SCOPE),
    _w("Is there {} somewhere on this image?", _SCOPE, "unseen"),
    # specificity
    _w("Is {} visible on this chest radiograph?", _SPEC),
    _w("Is there radiographic evidence of {}?", _SPEC),
    _w("Does this frontal chest film show {}?", _SPEC),
    _w("Is {} clearly present on this frontal view?", _SPEC),
    _w("Is there evidence of {} on this frontal view?", _SPEC),
    _w("Is {} visible on this frontal radiograph of the chest?", _SPEC, "unseen"),
    # lexical substitution (of the frame's words)
    _w("Does the film show {}?", _LEX),
    _w("Does the x-ray show {}?", _LEX),
    _w("Does the picture display {}?", _LEX),
    _w("Is {} shown on the scan?", _LEX),
    _w("Does the study reveal {}?", _LEX),
    _w("Is {} depicted in the study?", _LEX, "unseen"),
    # negation: answer-inverting, its own set
    _w("Is the image free of {}?", _NEG, "negation"),
    _w("Can {} be excluded?", _NEG, "negation"),
    _w("Is {} ruled out on this film?", _NEG, "negation"),
    _w("Is this film negative for {}?", _NEG, "negation"),
)


def _p(text: str, phenomenon: str, negated: bool = False) -> Phrasing:
    return Phrasing(text=text, phenomenon=phenomenon, negated=negated, split="base")


# The model's own training phrasings; index 0 is the canonical question ("Is there {TERMS[f][0]}?").
_BASE: dict[str, tuple[Phrasing, ...]] = {
    "effusion": (
        _p("Is there a pleural effusion?", _CANON),
        _p("Is pleural fluid present?", _LEX),
        _p("Does the image show a pleural effusion?", _SYN),
        _p("Is pleural effusion absent?", _NEG, negated=True),
    ),
    "cardiomegaly": (
        _p("Is there cardiomegaly?", _CANON),
        _p("Is the heart enlarged?", _LEX),
        _p("Does the image show cardiomegaly?", _SYN),
        _p("Is cardiomegaly absent?", _NEG, negated=True),
    ),
    "pneumothorax": (
        _p("Is there a pneumothorax?", _CANON),
        _p("Is there a collapsed lung?", _LEX),
        _p("Does the image show a pneumothorax?", _SYN),
        _p("Is pneumothorax absent?", _NEG, negated=True),
    ),
    "nodule": (
        _p("Is there a pulmonary nodule?", _CANON),
        _p("Is there a lung nodule?", _LEX),
        _p("Does the image show a pulmonary nodule?", _SYN),
        _p("Is a pulmonary nodule absent?", _NEG, negated=True),
    ),
    "consolidation": (
        _p("Is there consolidation?", _CANON),
        _p("Is there airspace consolidation?", _LEX),
        _p("Does the image show consolidation?", _SYN),
        _p("Is consolidation absent?", _NEG, negated=True),
    ),
    "edema": (
        _p("Is there pulmonary edema?", _CANON),
        _p("Is there pulmonary congestion?", _LEX),
        _p("Does the image show pulmonary edema?", _SYN),
        _p("Is pulmonary edema absent?", _NEG, negated=True),
    ),
}


def _check(finding: str) -> str:
    if finding not in _BASE:
        raise ValueError(f"unknown finding {finding!r}; use one of {FINDINGS}")
    return finding


def canonical(finding: str) -> str:
    """The canonical question, e.g. ``"Is there a pleural effusion?"``."""
    return _BASE[_check(finding)][0].text


def base_phrasings(finding: str) -> list[Phrasing]:
    """The phrasings the embedded model's answers are trained on (the canonical one first)."""
    return list(_BASE[_check(finding)])


def wrappers(pool: str) -> list[Wrapper]:
    """The wrappers of one pool (``shared``, ``unseen`` or ``negation``), in a fixed order."""
    if pool not in POOLS:
        raise ValueError(f"pool {pool!r}; use one of {POOLS}")
    return [w for w in WRAPPERS if w.pool == pool]


def combination_split(wrapper: Wrapper, finding: str) -> str:
    """``"train"`` or ``"eval"`` for a shared wrapper with ``finding``; the pool name otherwise.

    A checkerboard over (wrapper's index within its phenomenon, finding's index): every shared
    wrapper is fine-tuned on half the findings and evaluated on the other half, and every finding
    gets wrappers of every phenomenon on both sides.
    """
    if wrapper.pool != "shared":
        return wrapper.pool
    same = [w for w in WRAPPERS if w.pool == "shared" and w.phenomenon == wrapper.phenomenon]
    return "train" if (same.index(wrapper) + FINDINGS.index(_check(finding))) % 2 == 0 else "eval"


def paraphrases(finding: str, split: str | None = None) -> list[Phrasing]:
    """Every wrapper × term paraphrase of ``finding`` (of one split of :data:`SPLITS`, or all)."""
    out = []
    for w in WRAPPERS:
        s = combination_split(w, finding)
        if split is None or s == split:
            out += [Phrasing(w.fill(t), w.phenomenon, w.negated, s, w.template, k) for k, t in enumerate(TERMS[finding])]
    return out


def questions(finding: str) -> list[Phrasing]:
    """Every question about ``finding``: the base phrasings (canonical first), then the paraphrases."""
    return [*base_phrasings(finding), *paraphrases(finding)]


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
    "A radiographic study of the chest is also called a chest scan or a chest picture.",
    "The study may reveal findings anywhere in the chest, and the film can display them clearly.",
    "A finding that has been found on one image may be depicted somewhere else on another image.",
    "Radiologists often think a finding could be present when the evidence is weak.",
    "A film that is negative for a finding shows no evidence of it, and the finding is ruled out.",
    "The whole chest is shown on a frontal view.",
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


def finding_sentence(finding: str, present: bool, rng: np.random.Generator | int) -> str:
    """One report sentence that says ``finding`` is present (or absent), side and size drawn from ``rng``."""
    rng = _rng(rng)
    yes, no = _REPORT[_check(finding)]
    side, size, lobe = _pick(rng, _SIDES), _pick(rng, _SIZES), _pick(rng, ("upper", "lower"))
    text = _pick(rng, yes if present else no)
    return text.format(side=side, Side=side.capitalize(), size=size, Size=size.capitalize(), lobe=lobe)


def report_header(rng: np.random.Generator | int) -> str:
    """A report's first line (the view), drawn from ``rng``."""
    return _pick(_rng(rng), _HEADERS)


def report(findings: dict[str, bool], rng: np.random.Generator | int) -> str:
    """A short radiology report describing ``findings`` (one sentence per finding), for captioning."""
    rng = _rng(rng)
    parts = [report_header(rng)]
    for f in FINDINGS:
        parts.append(finding_sentence(f, bool(findings.get(f)), rng))
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
