"""The paraphrase record: one question, one rewording of it, one image, and the expected answers.

This mirrors a PSF-Med row. ``answer`` is the expected answer to ``question``;
``paraphrase_answer`` is the expected answer to ``paraphrase`` (the same, except for a negated
rewording, where it is the opposite). Records that share a ``question_id`` are paraphrases of
the same question. ``counterfactual_image``, when given, is the same patient with the asked finding
toggled, whose answer to ``question`` is the opposite of ``answer`` (the image-reliance control).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

ANSWERS = ("yes", "no")
PHENOMENA = (
    "lexical_substitution",
    "syntactic_restructuring",
    "negation_pattern",
    "scope",
    "specificity",
    "formality",
    "other",
)


@dataclass(frozen=True)
class ParaphrasePair:
    id: str
    question: str
    paraphrase: str
    answer: str
    image: Path | None = None
    paraphrase_answer: str | None = None
    phenomenon: str = "other"
    source: str = ""
    question_id: str = ""
    counterfactual_image: Path | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def expected_paraphrase(self) -> str:
        return self.paraphrase_answer or self.answer

    @property
    def negated(self) -> bool:
        """True when the paraphrase's expected answer is the opposite of the question's."""
        return self.expected_paraphrase != self.answer

    @property
    def in_negation_set(self) -> bool:
        """True for an answer-inverting pair (negated, or PSF-Med's ``negation_pattern``): such pairs
        are reported as their own set, apart from the meaning-preserving paraphrases."""
        return self.negated or self.phenomenon == "negation_pattern"

    @property
    def group(self) -> str:
        """The question this pair belongs to (``question_id``, else image + question)."""
        return self.question_id or f"{self.image}::{self.question}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image"] = None if self.image is None else str(self.image)
        if self.counterfactual_image is None:
            d.pop("counterfactual_image")
        else:
            d["counterfactual_image"] = str(self.counterfactual_image)
        if not d["extra"]:
            d.pop("extra")
        return d
