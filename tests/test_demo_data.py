"""The embedded default's synthetic data: images, phrasings, pairs (fast, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from mechmed.data.records import PHENOMENA, ParaphrasePair
from mechmed.demo.dataset import EVAL_SEED_OFFSET, Example, make_examples, make_pairs, write_demo_data
from mechmed.demo.images import FINDINGS, contact_sheet, make_images, render, sample_findings
from mechmed.demo.phrasings import (
    ANSWER_WORDS,
    canonical,
    corpus,
    heldout_phrasings,
    questions,
    train_phrasings,
    vocabulary,
)

SIZE = 32


def _box(a: np.ndarray, k: int) -> np.ndarray:
    """k x k mean filter (edge-padded) over the last two axes."""
    p = k // 2
    ap = np.pad(a, [(0, 0)] * (a.ndim - 2) + [(p, p), (p, p)], mode="edge")
    n, m = a.shape[-2:]
    return sum(ap[..., i : i + n, j : j + m] for i in range(k) for j in range(k)) / (k * k)


# ------------------------------------------------------------------------------------------ images


def test_make_images_deterministic_by_seed():
    a, b, c = make_images(6, 3), make_images(6, 3), make_images(6, 4)
    for (ia, fa), (ib, fb) in zip(a, b, strict=True):
        assert ia.dtype == np.uint8 and ia.shape == (SIZE, SIZE)
        assert np.array_equal(ia, ib) and fa == fb
    assert not all(np.array_equal(ia, ic) for (ia, _), (ic, _) in zip(a, c, strict=True))
    # image i depends only on (seed, i)
    assert all(np.array_equal(x, y) for (x, _), (y, _) in zip(make_images(3, 3), a[:3], strict=True))
    assert make_images(2, 3, size=48)[0][0].shape == (48, 48)


def test_sample_findings_prevalence():
    rng = np.random.default_rng(0)
    counts = np.array([[f[k] for k in FINDINGS] for f in (sample_findings(rng) for _ in range(2000))]).mean(0)
    assert np.all(np.abs(counts - 0.4) < 0.05)


def test_render_rejects_unknown_finding():
    with pytest.raises(ValueError, match="unknown findings"):
        render({"fracture": True}, np.random.default_rng(0))


# Region statistics (32 x 32 image, rows top to bottom): the change each finding should make.
def _lung_peak(a):
    dog = _box(a, 3) - _box(a, 7)
    return max(dog[4:22, 3:13].max(), dog[4:22, 19:29].max())


_REGION = {
    "effusion": (lambda a: a[20:28, 3:29].mean(), +1),  # lung bases brighten
    "cardiomegaly": (lambda a: a[18:28, 8:24].mean(), +1),  # heart shadow widens
    "pneumothorax": (lambda a: a[3:18, 3:29].mean(), -1),  # upper lungs darken
    "nodule": (_lung_peak, +1),  # a local bright peak in a lung
    "consolidation": (lambda a: a[5:24, 3:29].mean(), +1),  # lungs brighten
    "edema": (lambda a: a[5:24, 3:29].mean(), +1),  # lungs brighten
}
MARGIN = 4.0  # gray levels (of 255): the least mean paired change of the region statistic


def _paired(finding: str, n: int):
    """The same n patients rendered without and with ``finding`` (everything else as sampled)."""
    off, on = [], []
    for i in range(n):
        rng = np.random.default_rng([77, i])
        others = sample_findings(rng)
        state = rng.bit_generator.state
        for present, out in ((False, off), (True, on)):
            r = np.random.default_rng()
            r.bit_generator.state = state
            out.append(render({**others, finding: present}, r).astype(float))
    return np.stack(off), np.stack(on)


@pytest.mark.parametrize("finding", FINDINGS)
def test_each_finding_changes_the_image(finding):
    off, on = _paired(finding, 100)
    stat, sign = _REGION[finding]
    d = sign * np.array([stat(b) - stat(a) for a, b in zip(off, on, strict=True)])
    assert d.mean() >= MARGIN, f"{finding}: mean region change {d.mean():.1f} < {MARGIN}"
    if finding != "nodule":  # a nodule can sit outside the lateral lung boxes
        assert (d > 0).mean() >= 0.9
    # every patient's image changes visibly somewhere
    assert np.abs(on - off).max(axis=(1, 2)).min() >= 20


def _features(images: list[np.ndarray]) -> np.ndarray:
    """Pixels pooled in 4 x 4 blocks (mean, std, left-right asymmetry) and 8 x 8 local-peak maxima."""
    a = np.stack(images).astype(float) / 255

    def pool(x, f, b):
        return f(x.reshape(len(x), SIZE // b, b, SIZE // b, b), axis=(2, 4)).reshape(len(x), -1)

    peak = np.maximum(_box(a, 3) - _box(a, 7), 0)
    return np.concatenate(
        [
            pool(a, np.mean, 4),
            pool(a, np.std, 4),
            pool(np.abs(a - a[:, :, ::-1]), np.mean, 4),
            pool(peak, np.max, 8),
        ],
        1,
    )


def test_findings_learnable_by_logistic_regression():
    """A linear classifier on simple pooled pixel features beats 80% on held-out images, per finding.

    (A small CNN/ViT learns each finding far better; this only shows the signal is there.)
    """
    train, test = make_images(500, 1), make_images(250, 2)
    x, xt = _features([i for i, _ in train]), _features([i for i, _ in test])
    y = np.array([[f[k] for k in FINDINGS] for _, f in train], float)
    yt = np.array([[f[k] for k in FINDINGS] for _, f in test], float)
    mu, sd = x.mean(0), x.std(0) + 1e-6
    x, xt = np.c_[(x - mu) / sd, np.ones(len(x))], np.c_[(xt - mu) / sd, np.ones(len(xt))]
    w = np.zeros((x.shape[1], len(FINDINGS)))
    # einsum, not @: a tiny matmul in multi-threaded BLAS can stall on a busy machine
    for _ in range(400):
        p = 1 / (1 + np.exp(-np.einsum("nd,dk->nk", x, w)))
        w -= 0.5 * (np.einsum("nd,nk->dk", x, p - y) / len(x) + 1e-3 * w)
    acc = (((np.einsum("nd,dk->nk", xt, w)) > 0) == yt).mean(0)
    assert np.all(acc > 0.8), dict(zip(FINDINGS, acc.round(3), strict=True))


def test_contact_sheet_written(tmp_path):
    path = contact_sheet(make_images(10, 0), tmp_path / "sheet.png", ncols=4, scale=3)
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] == 4 * (SIZE * 3 + 4) + 4 and im.size[1] > 3 * SIZE * 3
    assert not list(tmp_path.glob(".*.tmp"))


# --------------------------------------------------------------------------------------- phrasings


@pytest.mark.parametrize("finding", FINDINGS)
def test_phrasing_lists(finding):
    qs = questions(finding)
    assert qs[0].phenomenon == "canonical" and qs[0].split == "train" and not qs[0].negated
    assert qs[0].text == canonical(finding) and train_phrasings(finding)[0] == qs[0]
    assert 2 <= len(train_phrasings(finding)) - 1 <= 4
    assert 6 <= len(heldout_phrasings(finding)) <= 10
    assert sum(p.negated for p in train_phrasings(finding)) <= 1
    assert sum(p.negated for p in heldout_phrasings(finding)) >= 1
    assert all(p.phenomenon in PHENOMENA for p in qs[1:])
    assert all(p.text.endswith("?") and p.split in ("train", "heldout") for p in qs)
    assert len({p.text for p in qs}) == len(qs)


def test_heldout_texts_differ_from_training_texts():
    train = {p.text.lower() for f in FINDINGS for p in train_phrasings(f)}
    held = {p.text.lower() for f in FINDINGS for p in heldout_phrasings(f)}
    assert not train & held


def test_heldout_words_are_in_corpus_or_training():
    held = vocabulary(p.text for f in FINDINGS for p in heldout_phrasings(f))
    known = vocabulary(corpus(0)) | vocabulary(p.text for f in FINDINGS for p in train_phrasings(f))
    assert held <= known, sorted(held - known)
    # the corpus alone covers them too: each held-out word is seen outside a question
    assert held - {"does", "do"} <= vocabulary(corpus(0)) | {"does", "do"}


def test_corpus_has_no_questions_or_answers():
    text = corpus(0)
    assert 300 <= len(text) <= 1000 and text == corpus(0) and text != corpus(1)
    assert not any("?" in s for s in text)
    assert not any(s.lower().startswith(("yes", "answer")) for s in text)
    assert ANSWER_WORDS == ("yes", "no")


def test_vocabulary_splitter():
    assert vocabulary("Is the X-ray free of pleural effusion?") == {
        "is",
        "the",
        "x-ray",
        "free",
        "of",
        "pleural",
        "effusion",
    }


# ---------------------------------------------------------------------------------- examples, pairs


def test_make_examples_answers_follow_negation():
    imgs = make_images(40, 5)
    for which in ("train", "heldout", "canonical"):
        ex = make_examples(imgs, which, 0)
        assert len(ex) == 40 * len(FINDINGS) and all(isinstance(e, Example) for e in ex)
        for e in ex:
            assert e.answer == ("yes" if e.findings[e.finding] != e.negated else "no")
            assert e.split == ("heldout" if which == "heldout" else "train")
        if which == "canonical":
            assert all(e.question == canonical(e.finding) for e in ex)
    ex = make_examples(imgs, "train", 0, findings_per_image=2)
    assert len(ex) == 80
    assert len(make_examples(imgs[:2], "heldout", 0, all_phrasings=True)) == 2 * sum(
        len(heldout_phrasings(f)) for f in FINDINGS
    )


def test_make_pairs_balanced_and_negation_flips():
    rows = make_pairs(make_images(60, 9), "heldout", 9, "t")
    answers = [r["answer"] for r in rows]
    assert 0.4 <= answers.count("yes") / len(answers) <= 0.65
    for r in rows:
        p = ParaphrasePair(**{**r, "image": Path(r["image"])})
        held = {q.text: q for q in heldout_phrasings(r["extra"]["finding"])}
        assert p.paraphrase in held and p.question == canonical(r["extra"]["finding"])
        assert p.negated == held[p.paraphrase].negated
        assert p.question_id == f"t-{Path(r['image']).stem}:{r['extra']['finding']}"
    assert any(r["answer"] != r["paraphrase_answer"] for r in rows)
    assert len({r["id"] for r in rows}) == len(rows)


def test_write_demo_data(tmp_path):
    a = write_demo_data(tmp_path / "a", n_images=12, seed=3)
    b = write_demo_data(tmp_path / "b", n_images=12, seed=3)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert Path("pairs.jsonl") in files and Path("train_pairs.jsonl") in files
    assert Path("contact_sheet.png") in files and Path("meta.json") in files
    assert Path("images/0000.png") in files and Path("train_images/0011.png") in files
    assert not [f for f in files if f.name.startswith(".")]
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)  # byte-identical

    meta = json.loads((a / "meta.json").read_text())
    assert (
        meta["seed"] == 3 and meta["eval_seed"] == 3 + EVAL_SEED_OFFSET and meta["findings"] == list(FINDINGS)
    )
    # evaluation images are not training images
    from PIL import Image

    ev = np.asarray(Image.open(a / "images/0000.png"))
    assert np.array_equal(ev, make_images(1, 3 + EVAL_SEED_OFFSET)[0][0])
    assert not np.array_equal(ev, make_images(1, 3)[0][0])

    for name, split in (("pairs.jsonl", "heldout"), ("train_pairs.jsonl", "train")):
        lines = (a / name).read_text().splitlines()
        assert lines and meta["counts"][name.split(".")[0]]["pairs"] == len(lines)
        for line in lines:
            row = json.loads(line)
            p = ParaphrasePair(**{**row, "image": Path(row["image"])})
            assert not p.image.is_absolute() and (a / p.image).is_file()
            assert p.source == "demo" and p.extra["split"] == split and p.answer in ANSWER_WORDS
            flipped = {"yes": "no", "no": "yes"}[p.answer]
            assert p.paraphrase_answer == (flipped if p.extra["negated"] else p.answer)
