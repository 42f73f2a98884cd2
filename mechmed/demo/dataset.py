"""Question items and PSF-Med-style paraphrase pairs over the synthetic images.

Seeds: the model trains on ``make_images(n, seed)``; the evaluation data that
:func:`write_demo_data` writes comes from ``make_images(n, seed + EVAL_SEED_OFFSET)``, so the
evaluation images are never training images. The pairs' expected answers follow negation: a
negated phrasing ("Is the image free of pleural effusion?") expects the opposite of the
canonical answer.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from mechmed.demo.images import FINDINGS, contact_sheet, make_images
from mechmed.demo.phrasings import Phrasing, canonical, heldout_phrasings, questions, train_phrasings
from mechmed.io import atomic_path, ensure_dir, write_json, write_jsonl

EVAL_SEED_OFFSET = 10_000
PHRASING_SETS = ("train", "heldout", "canonical")


@dataclass(frozen=True)
class Example:
    """One image, one question about one finding, and its expected answer."""

    image: np.ndarray
    findings: dict
    finding: str
    question: str
    answer: str  # "yes" or "no"
    phenomenon: str
    split: str
    negated: bool


def expected_answer(present: bool, negated: bool) -> str:
    """``"yes"`` when the finding is present, flipped for a negated phrasing."""
    return "yes" if present != negated else "no"


def _as_rng(rng: np.random.Generator | int) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _phrasings(finding: str, which: str) -> list[Phrasing]:
    if which == "train":
        return train_phrasings(finding)
    if which == "heldout":
        return heldout_phrasings(finding)
    if which == "canonical":
        return train_phrasings(finding)[:1]
    raise ValueError(f"phrasings={which!r}; use one of {PHRASING_SETS}")


def make_examples(
    images: Sequence[tuple[np.ndarray, dict[str, bool]]],
    phrasings: str = "train",
    rng: np.random.Generator | int = 0,
    *,
    findings_per_image: int | None = None,
    canonical_weight: float = 0.5,
    all_phrasings: bool = False,
) -> list[Example]:
    """Question items over ``images`` (pairs from :func:`~mechmed.demo.images.make_images`).

    For each image, each finding (or ``findings_per_image`` of them, sampled) is asked once in one
    phrasing from the set ``phrasings``: ``"canonical"`` asks the canonical question; ``"train"``
    asks it with probability ``canonical_weight`` and otherwise a training paraphrase chosen
    uniformly; ``"heldout"`` asks a held-out phrasing chosen uniformly. With ``all_phrasings`` every
    phrasing of the set is asked instead. The answer takes negation into account.
    """
    if phrasings not in PHRASING_SETS:
        raise ValueError(f"phrasings={phrasings!r}; use one of {PHRASING_SETS}")
    if findings_per_image is not None and not 1 <= findings_per_image <= len(FINDINGS):
        raise ValueError(f"findings_per_image={findings_per_image}; use 1..{len(FINDINGS)} or None")
    rng = _as_rng(rng)
    out: list[Example] = []
    for image, findings in images:
        chosen: Sequence[str] = FINDINGS
        if findings_per_image is not None:
            idx = np.sort(rng.choice(len(FINDINGS), size=findings_per_image, replace=False))
            chosen = [FINDINGS[i] for i in idx]
        for f in chosen:
            options = _phrasings(f, phrasings)
            if all_phrasings:
                picked = options
            elif phrasings == "train" and len(options) > 1:
                use_canon = rng.random() < canonical_weight
                picked = [options[0] if use_canon else options[1 + int(rng.integers(len(options) - 1))]]
            else:
                picked = [options[int(rng.integers(len(options)))]]
            present = bool(findings.get(f, False))
            for p in picked:
                out.append(
                    Example(
                        image=image,
                        findings=dict(findings),
                        finding=f,
                        question=p.text,
                        answer=expected_answer(present, p.negated),
                        phenomenon=p.phenomenon,
                        split=p.split,
                        negated=p.negated,
                    )
                )
    return out


def make_pairs(
    images_with_findings: Sequence[tuple[np.ndarray | str | Path, dict[str, bool]]],
    split: str,
    seed: int,
    id_prefix: str,
    *,
    per_question: int = 3,
) -> list[dict]:
    """Paraphrase pairs (dicts with :class:`~mechmed.data.records.ParaphrasePair`'s fields).

    Each item of ``images_with_findings`` is ``(image, findings)``, where ``image`` is a relative
    path (``"images/0007.png"``) or an array (then the path is ``images/{index:04d}.png``, the layout
    :func:`write_demo_data` writes). Per image, every present finding is asked and as many absent
    ones, sampled (at least one), so ``answer`` is roughly balanced. Each asked finding gets
    ``per_question`` pairs: the canonical question against a different phrasing of ``split``
    (``"train"`` or ``"heldout"``, never the canonical one), sampled without replacement.
    ``question_id`` is ``f"{image_id}:{finding}"`` with ``image_id = f"{id_prefix}-{stem}"``;
    ``id`` adds the phrasing's index in :func:`~mechmed.demo.phrasings.questions`.
    """
    if split not in ("train", "heldout"):
        raise ValueError(f"split={split!r}; use 'train' or 'heldout'")
    if per_question < 1:
        raise ValueError(f"per_question={per_question}; use 1 or more")
    rng = np.random.default_rng(seed)
    rows: list[dict] = []
    for i, (image, findings) in enumerate(images_with_findings):
        path = Path(f"images/{i:04d}.png") if isinstance(image, np.ndarray) else Path(image)
        image_id = f"{id_prefix}-{path.stem}"
        present = [f for f in FINDINGS if findings.get(f)]
        absent = [f for f in FINDINGS if not findings.get(f)]
        n_neg = min(len(absent), max(1, len(present)))
        neg_idx = sorted(rng.choice(len(absent), size=n_neg, replace=False).tolist()) if n_neg else []
        asked = sorted(present + [absent[j] for j in neg_idx], key=FINDINGS.index)
        for f in asked:
            all_q = questions(f)
            options = [k for k, p in enumerate(all_q) if p.split == split and p.phenomenon != "canonical"]
            ks = sorted(rng.choice(options, size=min(per_question, len(options)), replace=False).tolist())
            answer = expected_answer(bool(findings.get(f)), False)
            for k in ks:
                p = all_q[k]
                rows.append(
                    {
                        "id": f"{image_id}-{f}-{k:02d}",
                        "question": canonical(f),
                        "paraphrase": p.text,
                        "answer": answer,
                        "image": path.as_posix(),
                        "paraphrase_answer": expected_answer(bool(findings.get(f)), p.negated),
                        "phenomenon": p.phenomenon,
                        "source": "demo",
                        "question_id": f"{image_id}:{f}",
                        "extra": {"finding": f, "negated": p.negated, "split": p.split},
                    }
                )
    return rows


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(tmp, format="PNG")


def _summary(rows: list[dict]) -> dict:
    return {
        "pairs": len(rows),
        "questions": len({r["question_id"] for r in rows}),
        "answer": dict(sorted(Counter(r["answer"] for r in rows).items())),
        "negated": sum(r["answer"] != r["paraphrase_answer"] for r in rows),
        "phenomenon": dict(sorted(Counter(r["phenomenon"] for r in rows).items())),
    }


def write_demo_data(
    out_dir: str | Path, *, n_images: int = 200, seed: int = 0, size: int = 32, per_question: int = 3
) -> Path:
    """Write the embedded default's data set under ``out_dir`` and return ``out_dir``.

    * ``images/NNNN.png``: evaluation images, ``make_images(n_images, seed + 10_000, size)``.
    * ``pairs.jsonl``: held-out phrasing pairs over those images (the evaluation set).
    * ``train_images/NNNN.png``: training images, ``make_images(n_images, seed, size)`` (the first
      ``n_images`` of the stream the model trains on).
    * ``train_pairs.jsonl``: training-phrasing pairs over the training images (for consistency
      fine-tuning).
    * ``contact_sheet.png``: the first 48 evaluation images with their findings.
    * ``meta.json``: seeds, counts, findings and every phrasing.

    Image paths in the JSON lines are relative to ``out_dir``. Files are written atomically and
    are byte-identical for the same arguments.
    """
    if n_images < 1:
        raise ValueError(f"n_images={n_images}; use 1 or more")
    out = ensure_dir(out_dir, "out_dir")
    eval_seed = seed + EVAL_SEED_OFFSET
    sets = {}
    for name, folder, s in (("eval", "images", eval_seed), ("train", "train_images", seed)):
        samples = make_images(n_images, s, size)
        refs = []
        for i, (img, findings) in enumerate(samples):
            rel = f"{folder}/{i:04d}.png"
            _write_png(out / rel, img)
            refs.append((rel, findings))
        sets[name] = (samples, refs)
    pairs = make_pairs(sets["eval"][1], "heldout", eval_seed, "eval", per_question=per_question)
    train_pairs = make_pairs(sets["train"][1], "train", seed, "train", per_question=per_question)
    write_jsonl(out / "pairs.jsonl", pairs)
    write_jsonl(out / "train_pairs.jsonl", train_pairs)
    contact_sheet(sets["eval"][0][:48], out / "contact_sheet.png")
    meta = {
        "generator": "mechmed.demo.dataset.write_demo_data",
        "seed": seed,
        "train_seed": seed,
        "eval_seed": eval_seed,
        "n_images": n_images,
        "size": size,
        "per_question": per_question,
        "findings": list(FINDINGS),
        "prevalence": {
            name: {f: sum(bool(fd[f]) for _, fd in sets[name][1]) for f in FINDINGS}
            for name in ("eval", "train")
        },
        "counts": {"pairs": _summary(pairs), "train_pairs": _summary(train_pairs)},
        "phrasings": {f: [asdict(p) for p in questions(f)] for f in FINDINGS},
    }
    write_json(out / "meta.json", meta)
    return out


def load_pairs(path: str | Path) -> list[dict]:
    """Read a pairs JSON-lines file written by :func:`write_demo_data`."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
