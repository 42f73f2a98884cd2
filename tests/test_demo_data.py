"""The embedded default's synthetic data: images, phrasings, pairs (fast, no model)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mechmed.data.records import PHENOMENA, ParaphrasePair
from mechmed.demo.dataset import EVAL_SEED_OFFSET, PAIR_FILES, make_pairs, write_demo_data
from mechmed.demo.images import FINDINGS, contact_sheet, counterfactual, make_images, render, sample_findings
from mechmed.demo.phrasings import (
    ANSWER_WORDS,
    TERMS,
    WRAPPERS,
    base_phrasings,
    canonical,
    combination_split,
    corpus,
    paraphrases,
    questions,
    vocabulary,
    wrappers,
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


def test_counterfactual_is_the_same_patient_with_one_finding_toggled():
    """Toggling a finding replays the patient's draws: the replay with the findings unchanged is image i
    itself, and the toggled image has exactly the findings with that one flipped, and differs from it."""
    for i in range(6):
        image, findings = make_images(i + 1, 5)[i]
        for f in FINDINGS:
            cf, toggled = counterfactual(5, i, f)
            assert toggled == {**findings, f: not findings[f]}
            rng = np.random.default_rng([5, i])
            sample_findings(rng)
            assert np.array_equal(render(findings, rng), image)  # the replay is the image itself
            assert not np.array_equal(cf, image)
    with pytest.raises(ValueError, match="unknown finding"):
        counterfactual(5, 0, "fracture")


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
def test_base_phrasings(finding):
    qs = base_phrasings(finding)
    assert qs[0].phenomenon == "canonical" and qs[0].split == "base" and not qs[0].negated
    assert qs[0].text == canonical(finding) == f"Is there {TERMS[finding][0]}?"
    assert 2 <= len(qs) - 1 <= 4 and sum(p.negated for p in qs) <= 1
    assert all(p.phenomenon in PHENOMENA or p.phenomenon == "canonical" for p in qs)
    assert questions(finding)[: len(qs)] == qs and len({p.text for p in questions(finding)}) == len(questions(finding))


def test_wrappers_are_shared_and_grouped_by_phenomenon():
    shared, unseen, negation = wrappers("shared"), wrappers("unseen"), wrappers("negation")
    assert len(shared) + len(unseen) + len(negation) == len(WRAPPERS) == len({w.template for w in WRAPPERS})
    assert all(w.template.count("{}") == 1 and w.template.endswith("?") for w in WRAPPERS)
    by_ph: dict = {}
    for w in shared:
        by_ph.setdefault(w.phenomenon, []).append(w)
    # every meaning-preserving phenomenon has enough shared wrappers that none is learned as one template,
    # and at least one unseen wrapper
    assert set(by_ph) == {"syntactic_restructuring", "formality", "scope", "specificity", "lexical_substitution"}
    assert all(len(ws) >= 4 for ws in by_ph.values())
    assert {w.phenomenon for w in unseen} == set(by_ph)
    assert negation and all(w.negated and w.phenomenon == "negation_pattern" for w in negation)
    assert not any(w.negated for w in shared + unseen)
    assert all(len(TERMS[f]) >= 3 for f in FINDINGS)


def test_checkerboard_split():
    """Each shared wrapper is fine-tuned with half the findings and evaluated with the others; each finding
    has fine-tuning and evaluation wrappers of every phenomenon."""
    for w in wrappers("shared"):
        sides = [combination_split(w, f) for f in FINDINGS]
        assert sides.count("train") == sides.count("eval") == len(FINDINGS) // 2
    for f in FINDINGS:
        for split in ("train", "eval"):
            assert {p.phenomenon for p in paraphrases(f, split)} == set(
                w.phenomenon for w in wrappers("shared"))
        assert {combination_split(w, f) for w in wrappers("unseen")} == {"unseen"}
    # base phrasings are in no paraphrase set
    base = {p.text.lower() for f in FINDINGS for p in base_phrasings(f)}
    assert not base & {p.text.lower() for f in FINDINGS for p in paraphrases(f)}


def test_every_question_word_is_in_the_corpus_or_base_phrasings():
    asked = vocabulary(p.text for f in FINDINGS for p in questions(f))
    known = vocabulary(corpus(0)) | vocabulary(p.text for f in FINDINGS for p in base_phrasings(f))
    assert asked <= known, sorted(asked - known)
    # the corpus alone covers the paraphrases' words too: each is seen outside a question
    assert vocabulary(p.text for f in FINDINGS for p in paraphrases(f)) <= vocabulary(corpus(0))


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


def test_make_pairs_balanced_and_negation_flips():
    rows = make_pairs(make_images(60, 9), "negation", 9, "t", per_question=2)
    answers = [r["answer"] for r in rows]
    assert 0.4 <= answers.count("yes") / len(answers) <= 0.65
    for r in rows:
        p = ParaphrasePair(**{**r, "image": Path(r["image"])})
        f = r["extra"]["finding"]
        assert p.question == canonical(f) and p.negated and p.in_negation_set
        assert p.paraphrase in {q.text for q in paraphrases(f, "negation")}
        assert p.question_id == f"t-{Path(r['image']).stem}:{f}"
    assert len({r["id"] for r in rows}) == len(rows)
    for split in ("train", "eval", "unseen"):
        for r in make_pairs(make_images(20, 9), split, 9, "t"):
            p = ParaphrasePair(**{**r, "image": Path(r["image"])})
            assert not p.negated and r["extra"]["split"] == split
            assert p.paraphrase == next(w for w in WRAPPERS if w.template == r["extra"]["wrapper"]).fill(
                r["extra"]["term"])
    with pytest.raises(ValueError, match="split"):
        make_pairs(make_images(2, 9), "heldout", 9, "t")


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
    ev = np.asarray(Image.open(a / "images/0000.png"))
    assert np.array_equal(ev, make_images(1, 3 + EVAL_SEED_OFFSET)[0][0])
    assert not np.array_equal(ev, make_images(1, 3)[0][0])

    for split, name in PAIR_FILES.items():
        assert Path(name) in files
        lines = (a / name).read_text().splitlines()
        assert lines and meta["counts"][name.split(".")[0]]["pairs"] == len(lines)
        for line in lines:
            row = json.loads(line)
            p = ParaphrasePair(**{**row, "image": Path(row["image"])})
            assert not p.image.is_absolute() and (a / p.image).is_file()
            assert p.image.parts[0] == ("train_images" if split == "train" else "images")
            assert p.source == "demo" and p.extra["split"] == split and p.answer in ANSWER_WORDS
            assert p.extra["negated"] == (split == "negation") and p.phenomenon in PHENOMENA
            assert p.paraphrase.lower() == p.extra["wrapper"].format(p.extra["term"]).lower()
            flipped = {"yes": "no", "no": "yes"}[p.answer]
            assert p.paraphrase_answer == (flipped if p.extra["negated"] else p.answer)
            if split == "train":
                assert "counterfactual_image" not in row
                continue
            # the counterfactual: the same patient with the asked finding toggled, drawn independently here
            i, f = int(p.image.stem), p.extra["finding"]
            assert row["counterfactual_image"] == f"counterfactual/{i:04d}-{f}.png"
            rng = np.random.default_rng([3 + EVAL_SEED_OFFSET, i])
            findings = sample_findings(rng)
            assert findings[f] == (p.answer == "yes")
            want = render({**findings, f: not findings[f]}, rng)
            got = np.asarray(Image.open(a / row["counterfactual_image"]))
            assert np.array_equal(got, want) and not np.array_equal(got, np.asarray(Image.open(a / p.image)))


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines() if x.strip()]


def test_no_evaluation_pair_shares_an_image_or_a_wrapper_finding_combination_with_training(tmp_path):
    """The PSF-Med split, on the demo's own data settings: evaluation pairs (main, unseen and negation sets)
    are on other images and other (wrapper, finding) combinations than the fine-tuning pairs."""
    from mechmed.demo.build import DATA_SETTINGS
    from mechmed.demo.images import make_images as images

    root = write_demo_data(tmp_path / "d", seed=0, **DATA_SETTINGS)
    train = _rows(root / PAIR_FILES["train"])
    train_images = {np.asarray(Image.open(root / r["image"])).tobytes() for r in train}
    train_combos = {(r["extra"]["wrapper"], r["extra"]["finding"]) for r in train}
    for split in ("eval", "unseen", "negation"):
        rows = _rows(root / PAIR_FILES[split])
        assert len(rows) >= 500
        assert not {(r["extra"]["wrapper"], r["extra"]["finding"]) for r in rows} & train_combos
        assert not {r["image"] for r in rows} & {r["image"] for r in train}
        # and not the same pixels under another name
        assert not {np.asarray(Image.open(root / r["image"])).tobytes() for r in rows} & train_images
    # the main evaluation set spans every shared wrapper and every term, as the training set does
    ev = _rows(root / PAIR_FILES["eval"])
    for rows in (train, ev):
        assert {r["extra"]["wrapper"] for r in rows} == {w.template for w in wrappers("shared")}
        assert {(r["extra"]["finding"], r["extra"]["term"]) for r in rows} == {
            (f, t) for f in FINDINGS for t in TERMS[f]}
    assert images(1, 0)[0][0].shape == (DATA_SETTINGS["size"],) * 2

