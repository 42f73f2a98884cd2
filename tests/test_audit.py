"""The shortcut audit: answer balance per group, text-only lookups that cannot memorise, the model's
accuracy with gray images, and the command."""

from __future__ import annotations

import json

import numpy as np
import pytest

from mechmed.audit import audit_pairs, blind_accuracy, group_of, text_items
from mechmed.cli import main
from mechmed.data import ParaphrasePair
from mechmed.errors import MechmedError

FINDINGS = ("effusion", "edema", "nodule", "cardiomegaly")


def _pairs(answer_of, n_per_finding: int = 40, texts_per_finding: int = 4, unique_texts: bool = False, seed: int = 0):
    """Two paraphrases per question; ``answer_of(finding, i, rng)`` gives question i's answer."""
    rng = np.random.default_rng(seed)
    out = []
    for f in FINDINGS:
        for i in range(n_per_finding):
            ans = answer_of(f, i, rng)
            q = f"Is there {f} case {i}?" if unique_texts else f"Is there {f}?"
            for j in range(2):
                para = f"{f} seen, wording {i}-{j}?" if unique_texts else f"Any {f}, wording {j % texts_per_finding}?"
                out.append(ParaphrasePair(id=f"{f}-{i}-{j}", question=q, paraphrase=para, answer=ans,
                                          image=None, question_id=f"{f}-{i}", extra={"finding": f}))
    return out


def test_a_finding_with_one_answer_is_answered_by_its_name():
    pairs = _pairs(lambda f, i, rng: "yes" if f in ("effusion", "edema") else "no")
    res = audit_pairs(pairs)
    assert res["group_lookup_accuracy"] == 1.0 and res["text_lookup_accuracy"] == 1.0
    assert sorted(res["groups_with_one_answer"]) == sorted(FINDINGS)
    assert res["warning"] and "100%" in res["warning"] and res["majority_accuracy"] == 0.5
    assert {b["group"]: b["yes_share"] for b in res["balance"]} == {"cardiomegaly": 0, "edema": 1, "effusion": 1,
                                                                   "nodule": 0}


def test_balanced_answers_leave_text_at_chance():
    pairs = _pairs(lambda f, i, rng: "yes" if i % 2 else "no", n_per_finding=100)
    res = audit_pairs(pairs)
    assert abs(res["text_lookup_accuracy"] - 0.5) < 0.1 and abs(res["group_lookup_accuracy"] - 0.5) < 0.1
    assert res["warning"] is None and res["groups_with_one_answer"] == []


def test_the_lookup_cannot_memorise_a_question():
    """Every phrasing is unique to its question and its answer random: answering a phrasing from the
    other folds cannot see it, so the lookup is no better than the majority answer (it would be 1.0 if
    a question's own answer leaked in)."""
    pairs = _pairs(lambda f, i, rng: "yes" if rng.random() < 0.5 else "no", n_per_finding=100, unique_texts=True)
    res = audit_pairs(pairs, seed=3)
    assert res["share_answered_by_text"] == 0.0
    assert res["text_lookup_accuracy"] == res["group_lookup_accuracy"] < 0.62
    assert len(text_items(pairs)) == 3 * 4 * 100  # the question once, each paraphrase once


def test_group_is_the_finding_else_the_question_type_else_the_text():
    p = ParaphrasePair(id="a", question="Is There  edema?", paraphrase="x?", answer="yes", image=None)
    assert group_of(p) == "is there edema"
    assert group_of(ParaphrasePair(**{**p.to_dict(), "extra": {"question_type": "edema"}})) == "edema"
    with pytest.raises(MechmedError, match="threshold"):
        audit_pairs([p], threshold=0)


def test_blind_accuracy_by_hand(tiny_bundles, tiny_workspace):
    from mechmed.data import load_pairs
    from mechmed.readout import gray_like, load_image, margins

    b = tiny_bundles["Gemma3ForConditionalGeneration"]
    pairs = load_pairs(tiny_workspace[0] / "pairs.jsonl")
    got = blind_accuracy(b, pairs, batch_size=3)
    canon = list({(p.image, p.question): p for p in pairs}.values())
    imgs = [load_image(p.image) for p in canon]
    label = np.array([p.answer == "yes" for p in canon])
    m = margins(b, [p.question for p in canon], [gray_like(im) for im in imgs], batch_size=5).numpy()
    assert got["n_questions"] == len(canon) == 4
    assert got["accuracy_gray_image"] == pytest.approx(((m > 0) == label).mean())


def test_audit_data_command(tiny_workspace, tmp_path, capsys):
    root, ckpt = tiny_workspace
    out = tmp_path / "audit.json"
    assert main(["audit-data", "--data", str(root / "pairs.jsonl"), "--model", str(ckpt), "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["n_questions"] == 4 and res["model_accuracy"]["n_questions"] == 4
    assert "with a gray image" in capsys.readouterr().out
    assert main(["audit-data", "--data", str(root / "pairs.jsonl"), "--threshold", "1.5",
                 "--out", str(tmp_path / "bad.json")]) == 2
    assert "--threshold 1.5" in capsys.readouterr().err and not (tmp_path / "bad.json").exists()
