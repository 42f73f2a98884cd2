"""PSF-Med-style paraphrase pairs over the synthetic images: the embedded default's data set.

Every pair asks the canonical question ("Is there a pleural effusion?") against one compositional
paraphrase (a wrapper filled with a term, :mod:`mechmed.demo.phrasings`) about the same image.
The pairs are split the way PSF-Med's are:

* ``train_pairs.jsonl``: fine-tuning combinations (``split == "train"``) on training images;
* ``pairs.jsonl``: the other (wrapper, finding) combinations (``"eval"``) on evaluation images,
  the default evaluation set;
* ``unseen_pairs.jsonl``: wrappers never fine-tuned with any finding, on the evaluation images;
* ``negation_pairs.jsonl``: answer-inverting wrappers on the evaluation images, whose expected
  answer is the opposite of the canonical question's.

No evaluation pair shares an image or a (wrapper, finding) combination with a training pair.
Seeds: the model trains on ``make_images(n, seed)``; the evaluation images come from
``make_images(n, seed + EVAL_SEED_OFFSET)``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
from PIL import Image

from mechmed.demo.images import FINDINGS, contact_sheet, counterfactual, make_images
from mechmed.demo.phrasings import TERMS, WRAPPERS, base_phrasings, canonical, paraphrases
from mechmed.io import atomic_path, ensure_dir, write_json, write_jsonl

EVAL_SEED_OFFSET = 10_000
#: The file each set of pairs is written to; ``train`` pairs use the training images, the others
#: the evaluation images.
PAIR_FILES = {"eval": "pairs.jsonl", "unseen": "unseen_pairs.jsonl", "negation": "negation_pairs.jsonl",
              "train": "train_pairs.jsonl"}
#: The folder of the counterfactual images: ``NNNN-{finding}.png`` is evaluation image ``NNNN``'s patient
#: with ``finding`` toggled (:func:`mechmed.demo.images.counterfactual`).
COUNTERFACTUAL_DIR = "counterfactual"
#: Pairs per asked question in each set (default of :func:`write_demo_data`).
PER_QUESTION = {"eval": 3, "unseen": 1, "negation": 1, "train": 4}


def expected_answer(present: bool, negated: bool) -> str:
    """``"yes"`` when the finding is present, flipped for a negated phrasing."""
    return "yes" if present != negated else "no"


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
    ``per_question`` pairs: the canonical question against paraphrases of ``split`` (``"train"``,
    ``"eval"``, ``"unseen"`` or ``"negation"``), sampled without replacement. ``question_id`` is
    ``f"{image_id}:{finding}"`` with ``image_id = f"{id_prefix}-{stem}"``; ``id`` adds the
    wrapper's index in :data:`~mechmed.demo.phrasings.WRAPPERS` and the term's index. ``extra``
    records the finding, the wrapper, the term, the split and whether the paraphrase is negated.
    """
    if split not in PAIR_FILES:
        raise ValueError(f"split={split!r}; use one of {', '.join(PAIR_FILES)}")
    if per_question < 1:
        raise ValueError(f"per_question={per_question}; use 1 or more")
    rng = np.random.default_rng(seed)
    options = {f: paraphrases(f, split) for f in FINDINGS}
    wrapper_index = {w.template: i for i, w in enumerate(WRAPPERS)}
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
            ks = sorted(rng.choice(len(options[f]), size=min(per_question, len(options[f])), replace=False).tolist())
            answer = expected_answer(bool(findings.get(f)), False)
            for k in ks:
                p = options[f][k]
                rows.append(
                    {
                        "id": f"{image_id}-{f}-{wrapper_index[p.wrapper]:02d}{p.term}",
                        "question": canonical(f),
                        "paraphrase": p.text,
                        "answer": answer,
                        "image": path.as_posix(),
                        "paraphrase_answer": expected_answer(bool(findings.get(f)), p.negated),
                        "phenomenon": p.phenomenon,
                        "source": "demo",
                        "question_id": f"{image_id}:{f}",
                        "extra": {"finding": f, "wrapper": p.wrapper, "term": TERMS[f][p.term],
                                  "split": p.split, "negated": p.negated},
                    }
                )
    return rows


def _write_png(path: Path, image: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(np.asarray(image, dtype=np.uint8), mode="L").save(tmp, format="PNG")


def _counterfactual_path(i: int, finding: str) -> str:
    return f"{COUNTERFACTUAL_DIR}/{i:04d}-{finding}.png"


def _with_counterfactual(row: dict, toggled: set) -> dict:
    """``row`` with ``counterfactual_image`` after ``image``: its patient with the asked finding toggled
    (the pair (image index, finding) is added to ``toggled``, the images to draw)."""
    i, finding = int(Path(row["image"]).stem), row["extra"]["finding"]
    toggled.add((i, finding))
    out = {}
    for key, value in row.items():
        out[key] = value
        if key == "image":
            out["counterfactual_image"] = _counterfactual_path(i, finding)
    return out


def _summary(rows: list[dict]) -> dict:
    return {
        "pairs": len(rows),
        "questions": len({r["question_id"] for r in rows}),
        "answer": dict(sorted(Counter(r["answer"] for r in rows).items())),
        "negated": sum(r["answer"] != r["paraphrase_answer"] for r in rows),
        "phenomenon": dict(sorted(Counter(r["phenomenon"] for r in rows).items())),
    }


def write_demo_data(
    out_dir: str | Path, *, n_images: int = 200, seed: int = 0, size: int = 32, per_question: dict | None = None
) -> Path:
    """Write the embedded default's data set under ``out_dir`` and return ``out_dir``.

    * ``images/NNNN.png``: evaluation images, ``make_images(n_images, seed + 10_000, size)``.
    * ``pairs.jsonl``, ``unseen_pairs.jsonl``, ``negation_pairs.jsonl``: the evaluation,
      unseen-wrapper and negation pairs over those images (see the module doc). Each row's
      ``counterfactual_image`` is ``counterfactual/NNNN-{finding}.png``: the same patient with the
      asked finding toggled, so its expected answer is the opposite (the image-reliance control).
    * ``train_images/NNNN.png``: training images, ``make_images(n_images, seed, size)`` (the first
      ``n_images`` of the stream the model trains on).
    * ``train_pairs.jsonl``: fine-tuning pairs over the training images.
    * ``contact_sheet.png``: the first 48 evaluation images with their findings.
    * ``meta.json``: seeds, counts, findings, every wrapper and term, and the base phrasings.

    ``per_question`` maps a set to its pairs per asked question (default :data:`PER_QUESTION`).
    Image paths in the JSON lines are relative to ``out_dir``. Files are written atomically and
    are byte-identical for the same arguments.
    """
    if n_images < 1:
        raise ValueError(f"n_images={n_images}; use 1 or more")
    per_question = {**PER_QUESTION, **(per_question or {})}
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
    counts, toggled = {}, set()
    for k, (split, filename) in enumerate(PAIR_FILES.items()):
        images, s = (sets["train"][1], seed) if split == "train" else (sets["eval"][1], eval_seed)
        rows = make_pairs(images, split, [s, k], "train" if split == "train" else "eval",
                          per_question=per_question[split])
        if split != "train":
            rows = [_with_counterfactual(r, toggled) for r in rows]
        write_jsonl(out / filename, rows)
        counts[filename.split(".")[0]] = _summary(rows)
    for i, finding in sorted(toggled):
        _write_png(out / _counterfactual_path(i, finding), counterfactual(eval_seed, i, finding, size)[0])
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
        "counts": counts,
        "files": dict(PAIR_FILES),
        "wrappers": [asdict(w) for w in WRAPPERS],
        "terms": {f: list(TERMS[f]) for f in FINDINGS},
        "base_phrasings": {f: [asdict(p) for p in base_phrasings(f)] for f in FINDINGS},
    }
    write_json(out / "meta.json", meta)
    return out
