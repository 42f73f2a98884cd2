"""Loading and writing paraphrase pairs: JSONL, CSV, PSF-Med layout, and every bad-input message."""

from __future__ import annotations

import csv
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mechmed.data import ALIASES, ParaphrasePair, load_pairs, load_psf_med, write_pairs
from mechmed.data.loaders import FIELDS
from mechmed.errors import MechmedError


def png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


def jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows), encoding="utf-8")
    return path


def row(i: int = 0, **kw) -> dict:
    r = {"id": f"p{i}", "question": "Is there a pleural effusion?", "paraphrase": "Is pleural fluid present?",
         "answer": "yes", "image": "images/a.png"}
    r.update(kw)
    return {k: v for k, v in r.items() if v is not ...}


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    png(tmp_path / "images" / "a.png")
    png(tmp_path / "images" / "b.png", 30)
    return tmp_path


def raises_at(path: Path, line: int | None, *args, **kwargs) -> str:
    with pytest.raises(MechmedError) as info:
        load_pairs(path, *args, **kwargs)
    msg = str(info.value)
    assert path.name in msg, msg
    if line is not None:
        assert re.search(rf"\bline {line}\b", msg), msg
    assert "\n" not in msg
    return msg


# --- round trips ------------------------------------------------------------------------------


def test_jsonl_round_trip(data_dir: Path) -> None:
    rows = [
        row(0),
        row(1, answer="No", image="images/b.png", paraphrase_answer="yes", phenomenon="negation_pattern",
            source="s", question_id="q1", finding="effusion"),
        row(2, answer=True, image=str(data_dir / "images" / "a.png"), extra={"split": "heldout"}),
    ]
    path = jsonl(data_dir / "pairs.jsonl", rows)
    pairs = load_pairs(path)
    assert [p.id for p in pairs] == ["p0", "p1", "p2"]
    assert [p.answer for p in pairs] == ["yes", "no", "yes"]
    assert pairs[0].image == data_dir / "images" / "a.png"
    assert pairs[1].image == data_dir / "images" / "b.png"
    assert pairs[1].negated and pairs[1].extra == {"finding": "effusion"}
    assert pairs[2].extra == {"split": "heldout"}
    assert load_pairs(data_dir) == pairs  # a directory means its pairs.jsonl

    out = write_pairs(pairs, data_dir / "copy.jsonl")
    written = [json.loads(x) for x in out.read_text().splitlines()]
    assert written[0]["image"] == "images/a.png"  # relative to the file's directory
    again = load_pairs(out)
    assert again == pairs and [p.extra for p in again] == [p.extra for p in pairs]

    elsewhere = data_dir / "sub" / "deeper"
    elsewhere.mkdir(parents=True)
    out2 = write_pairs(pairs, elsewhere)  # directory -> pairs.jsonl, absolute image paths
    assert out2 == elsewhere / "pairs.jsonl"
    assert Path(json.loads(out2.read_text().splitlines()[0])["image"]).is_absolute()
    assert load_pairs(out2) == pairs


def test_counterfactual_image_column(data_dir: Path) -> None:
    """``counterfactual_image`` resolves as ``image`` does, round-trips through write_pairs (relative
    where it can be), is optional per row, and a missing file is an error naming the row."""
    path = jsonl(data_dir / "pairs.jsonl", [row(0, counterfactual_image="images/b.png"),
                                           row(1, counterfactual_image=""), row(2)])
    pairs = load_pairs(path)
    assert pairs[0].counterfactual_image == data_dir / "images" / "b.png"
    assert pairs[1].counterfactual_image is None and pairs[2].counterfactual_image is None
    assert "counterfactual_image" not in pairs[1].to_dict() and pairs[0].extra == {}
    out = write_pairs(pairs, data_dir / "copy.jsonl")
    assert json.loads(out.read_text().splitlines()[0])["counterfactual_image"] == "images/b.png"
    assert load_pairs(out) == pairs
    far = write_pairs(pairs, data_dir / "sub" / "x.jsonl")
    assert Path(json.loads(far.read_text().splitlines()[0])["counterfactual_image"]).is_absolute()
    msg = raises_at(jsonl(data_dir / "bad.jsonl", [row(0), row(1, counterfactual_image="images/gone.png")]), 2)
    assert "counterfactual image 'images/gone.png' not found" in msg
    assert "must be a path" in raises_at(jsonl(data_dir / "bad2.jsonl", [row(0, counterfactual_image=3)]), 1)
    # a column of another meaning that happens to be called "counterfactual" stays in extra
    [p] = load_pairs(jsonl(data_dir / "other.jsonl", [row(0, counterfactual=False)]))
    assert p.counterfactual_image is None and p.extra == {"counterfactual": False}


def test_csv_round_trip(data_dir: Path) -> None:
    path = data_dir / "pairs.csv"
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["id", "question", "paraphrase", "answer", "image", "paraphrase_answer", "phenomenon", "note"])
        w.writerow(["a", "Is there edema?", "Is edema, visible?", "1", "images/a.png", "", "Lexical Substitution",
                    "x"])
        w.writerow(["b", "Is the heart\nenlarged?", "Cardiomegaly?", "FALSE", "images/b.png", "0", "", ""])
    pairs = load_pairs(path)
    assert [(p.id, p.answer, p.paraphrase_answer) for p in pairs] == [("a", "yes", None), ("b", "no", "no")]
    assert pairs[0].phenomenon == "lexical_substitution" and pairs[1].phenomenon == "other"
    assert pairs[0].paraphrase == "Is edema, visible?" and pairs[0].extra == {"note": "x"}
    assert pairs[1].question == "Is the heart\nenlarged?"
    assert load_pairs(write_pairs(pairs, data_dir / "out.jsonl")) == pairs

    tsv = data_dir / "pairs.tsv"
    tsv.write_text("question\tparaphrase\tanswer\timage\nIs it?\tIs it so?\tno\timages/a.png\n")
    [p] = load_pairs(tsv)
    assert p.id == "pairs:2" and p.answer == "no"


# --- columns and aliases --------------------------------------------------------------------


def test_column_mapping(data_dir: Path) -> None:
    path = jsonl(data_dir / "x.jsonl", [{"uid_": 7, "q": "Is there edema?", "p": "Edema?", "gt": "yes",
                                          "img": "images/a.png", "question": "ignored -> extra"}])
    cols = {"id": "uid_", "question": "q", "paraphrase": "p", "answer": "gt", "image": "img"}
    [p] = load_pairs(path, columns=cols)
    assert (p.id, p.question, p.paraphrase, p.answer) == ("7", "Is there edema?", "Edema?", "yes")
    assert p.extra == {"question": "ignored -> extra"}
    assert load_pairs(path, columns="id=uid_,question=q,paraphrase=p,answer=gt,image=img") == [p]
    with pytest.raises(MechmedError, match="unknown field"):
        load_pairs(path, columns={"q": "question"})
    with pytest.raises(MechmedError, match="mapped to both"):
        load_pairs(path, columns={"question": "q", "paraphrase": "q"})
    msg = raises_at(path, 1, columns={"question": "nope"})
    assert "'nope'" in msg and "columns=" in msg


def test_aliases(data_dir: Path) -> None:
    path = jsonl(data_dir / "psf.jsonl", [{
        "original_question": "Is there an effusion?", "paraphrased_question": "Any effusion?",
        "ground_truth": "No", "dicom_id": "a", "paraphrase_type": "syntactic_restructuring",
        "qid": "q9", "subject_id": 10001}])
    [p] = load_pairs(path, image_root=data_dir / "images")  # dicom_id without suffix -> a.png
    assert p.answer == "no" and p.image == data_dir / "images" / "a.png"
    assert p.phenomenon == "syntactic_restructuring" and p.question_id == "q9"
    assert p.extra == {"subject_id": 10001} and p.id == "psf:1"
    # no column name serves two fields
    names = [n for names in ALIASES.values() for n in names]
    assert len(names) == len(set(names)) and set(ALIASES) == set(FIELDS)


def test_answer_forms(data_dir: Path) -> None:
    forms = ["yes", "No", " YES ", "Yes.", "true", "False", "1", "0", 1, 0, True, False, 1.0]
    path = jsonl(data_dir / "a.jsonl", [row(i, answer=a) for i, a in enumerate(forms)])
    got = [p.answer for p in load_pairs(path)]
    assert got == ["yes", "no", "yes", "yes", "yes", "no", "yes", "no", "yes", "no", "yes", "no", "yes"]


def test_negation_without_paraphrase_answer_is_not_guessed(data_dir: Path) -> None:
    path = jsonl(data_dir / "n.jsonl", [row(0, phenomenon="negation_pattern", paraphrase="Is it free of effusion?")])
    [p] = load_pairs(path)
    assert p.paraphrase_answer is None and p.expected_paraphrase == "yes" and not p.negated


# --- images ------------------------------------------------------------------------------------


def test_image_resolution(data_dir: Path) -> None:
    sub = data_dir / "meta"
    sub.mkdir()
    path = jsonl(sub / "pairs.jsonl", [row(0, image="../images/a.png"), row(1, image=str(data_dir / "images/b.png"))])
    pairs = load_pairs(path)  # relative to the data file's directory; absolute kept
    assert [p.image for p in pairs] == [data_dir / "images/a.png", data_dir / "images/b.png"]

    path2 = jsonl(sub / "rooted.jsonl", [row(0, image="a.png"), row(1, image=str(data_dir / "images/b.png"))])
    msg = raises_at(path2, 1)
    assert "a.png" in msg and "image_root" in msg
    pairs = load_pairs(path2, image_root=data_dir / "images")
    assert [p.image for p in pairs] == [data_dir / "images/a.png", data_dir / "images/b.png"]
    with pytest.raises(MechmedError, match="not a directory"):
        load_pairs(path2, image_root=data_dir / "nowhere")


def test_images_optional(data_dir: Path) -> None:
    path = jsonl(data_dir / "p.jsonl", [row(0, image=...), row(1, image="gone.png"), row(2, image=None)])
    raises_at(path, 1)
    pairs = load_pairs(path, require_images=False)
    assert pairs[0].image is None and pairs[1].image == data_dir / "gone.png" and pairs[2].image is None


def test_broken_image(data_dir: Path) -> None:
    (data_dir / "images" / "bad.png").write_bytes(b"not a png at all")
    path = jsonl(data_dir / "p.jsonl", [row(0), row(1, image="images/bad.png")])
    msg = raises_at(path, 2)
    assert "bad.png" in msg and "check_images=False" in msg
    assert load_pairs(path, check_images=False)[1].image == data_dir / "images/bad.png"


# --- bad input -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "line", "needle"),
    [
        ([row(0), "{not json", row(2)], 2, "malformed JSON"),
        ([row(0), "", "[1, 2]"], 3, "got a list"),
        ([row(0), '"just text"'], 2, "got text"),
        ([row(0, question=...)], 1, "no question"),
        ([row(0), row(1, paraphrase=...)], 2, "no paraphrase"),
        ([row(0), row(1), row(2, question="  ")], 3, "empty"),
        ([row(0, paraphrase="")], 1, "empty"),
        ([row(0, question=None)], 1, "empty"),
        ([row(0, question=3)], 1, "must be text"),
        ([row(0, answer="maybe")], 1, "not a yes/no"),
        ([row(0, answer=...)], 1, "no answer"),
        ([row(0, answer=2)], 1, "not a yes/no"),
        ([row(0, paraphrase_answer="perhaps")], 1, "not a yes/no"),
        ([row(0), row(1), row(0)], 3, "already used"),
        ([row(0, image="images/missing.png")], 1, "not found"),
        ([row(0, image=["a"])], 1, "must be a path"),
        ([row(0, id=[1])], 1, "must be text or an integer"),
    ],
)
def test_bad_jsonl_rows(data_dir: Path, lines, line: int, needle: str) -> None:
    path = jsonl(data_dir / "bad.jsonl", lines)
    assert needle in raises_at(path, line)


@pytest.mark.parametrize(
    ("text", "line", "needle"),
    [
        ("question,paraphrase,answer,image\nA?,B?,yes,images/a.png\nC?,D?,maybe,images/a.png\n", 3, "not a yes/no"),
        ("question,paraphrase,answer,image\n\nA?,B?,yes,images/a.png\nC?,,no,images/a.png\n", 4, "empty"),
        ('question,paraphrase,answer,image\n"A\nmultiline?",B?,yes,images/a.png\nC?,D?,yes\n', 4, "fields"),
        ("question,question,answer\nA?,B?,yes\n", 1, "duplicate column"),
        ("id,question,paraphrase,answer,image\nx,A?,B?,yes,images/a.png\nx,A?,B?,no,images/a.png\n", 3,
         "already used"),
        ("question,paraphrase,image\nA?,B?,images/a.png\n", 2, "no answer"),
    ],
)
def test_bad_csv_rows(data_dir: Path, text: str, line: int, needle: str) -> None:
    path = data_dir / "bad.csv"
    path.write_text(text, encoding="utf-8")
    assert needle in raises_at(path, line)


def test_bad_files(data_dir: Path) -> None:
    missing = data_dir / "nope.jsonl"
    with pytest.raises(MechmedError, match="nope.jsonl: not found"):
        load_pairs(missing)
    with pytest.raises(MechmedError, match="no pairs.jsonl"):
        load_pairs(data_dir / "images")
    empty = data_dir / "empty.jsonl"
    empty.write_text("\n  \n")
    assert "no rows" in raises_at(empty, None)
    header_only = data_dir / "h.csv"
    header_only.write_text("question,paraphrase,answer\n")
    assert "no rows" in raises_at(header_only, None)
    blank_csv = data_dir / "blank.csv"
    blank_csv.write_text("")
    assert "empty" in raises_at(blank_csv, None)
    latin = data_dir / "latin.jsonl"
    latin.write_bytes(json.dumps(row(0)).encode() + b"\n" + b'{"question": "caf\xe9"}\n')
    assert "UTF-8" in raises_at(latin, 2)
    other = data_dir / "pairs.xlsx"
    other.write_bytes(b"")
    with pytest.raises(MechmedError, match="unsupported"):
        load_pairs(other)


# --- PSF-Med layout --------------------------------------------------------------------------


def psf_rows() -> list[dict]:
    return [
        {"original_question": "Is there a pleural effusion?", "paraphrased_question": "Is pleural fluid seen?",
         "answer": "yes", "image_path": "files/p10/p10000032/s5041/abc.jpg", "phenomenon": "lexical_substitution",
         "is_yesno": True, "question_id": "q1"},
        {"original_question": "Where is the opacity?", "paraphrased_question": "Which lobe has the opacity?",
         "answer": "left lower lobe", "image_path": "files/p10/p10000032/s5041/abc.jpg",
         "phenomenon": "scope", "is_yesno": False, "question_id": "q2"},
        {"original_question": "Is the heart enlarged?", "paraphrased_question": "Is the heart not enlarged?",
         "answer": "No", "image_path": "def", "phenomenon": "negation_pattern", "is_yesno": True,
         "question_id": "q3"},
    ]


@pytest.fixture
def psf_images(tmp_path: Path) -> Path:
    root = tmp_path / "mimic-cxr-jpg"
    (root / "nested").mkdir(parents=True)
    Image.new("RGB", (8, 8), (10, 20, 30)).save(root / "nested" / "abc.jpg")
    png(root / "other" / "def.png")
    return root


def test_psf_med_local_parquet(tmp_path: Path, psf_images: Path) -> None:
    from datasets import Dataset

    files = tmp_path / "hub" / "mimic" / "test-00000-of-00001.parquet"
    files.parent.mkdir(parents=True)
    Dataset.from_list(psf_rows()).to_parquet(str(files))
    pairs = load_psf_med("mimic", image_root=psf_images, data_files=str(files), cache_dir=tmp_path / "cache")
    assert [p.question_id for p in pairs] == ["q1", "q3"]  # is_yesno filter
    assert pairs[0].image == psf_images / "nested" / "abc.jpg"  # by file name under image_root
    assert pairs[1].image == psf_images / "other" / "def.png"  # by stem
    assert pairs[1].answer == "no" and pairs[1].paraphrase_answer is None
    assert pairs[0].id == "psf-med/mimic:1" and pairs[1].id == "psf-med/mimic:3"
    assert all(p.source == "psf-med/mimic" and "is_yesno" not in p.extra for p in pairs)


def test_psf_med_local_json_and_errors(tmp_path: Path, psf_images: Path) -> None:
    rows = psf_rows()
    rows[2]["answer"] = "perhaps"
    f = jsonl(tmp_path / "test.jsonl", rows)
    with pytest.raises(MechmedError, match=r"test\.jsonl, row 3: .*not a yes/no"):
        load_psf_med(image_root=psf_images, data_files={"test": [str(f)]}, cache_dir=tmp_path / "cache")
    renamed = [{"q": r["original_question"], "p": r["paraphrased_question"], "label": "yes",
                "image_path": "abc.jpg"} for r in psf_rows()]
    g = jsonl(tmp_path / "renamed.jsonl", renamed)
    pairs = load_psf_med("vindr", image_root=psf_images, data_files=str(g), cache_dir=tmp_path / "cache",
                         columns={"question": "q", "paraphrase": "p"})
    assert len(pairs) == 3 and pairs[0].source == "psf-med/vindr"  # no is_yesno column: all rows kept
    with pytest.raises(MechmedError, match="not found"):
        load_psf_med(image_root=psf_images, data_files=str(tmp_path / "missing.parquet"))
    with pytest.raises(MechmedError, match="image_root"):
        load_psf_med(image_root=None, data_files=str(g))
    with pytest.raises(MechmedError, match="config="):
        load_psf_med("chexpert", image_root=psf_images)


def test_psf_med_hub_offline(tmp_path: Path, psf_images: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(MechmedError, match="saillab/psf-med.*(HF_HUB_OFFLINE|local_files_only)"):
        load_psf_med("mimic", image_root=psf_images, cache_dir=tmp_path / "cache")


def _hub_cache_dataset(hub: Path, repo: str, files: dict[str, object]) -> Path:
    """A hub dataset snapshot laid out by hand as huggingface_hub caches it (refs/main -> snapshot)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    top = hub / f"datasets--{repo.replace('/', '--')}"
    (top / "refs").mkdir(parents=True)
    (top / "refs" / "main").write_text(sha)
    snap = top / "snapshots" / sha
    for rel, write in files.items():
        (snap / rel).parent.mkdir(parents=True, exist_ok=True)
        write(snap / rel)
    return snap


@pytest.fixture
def offline_hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Offline, with empty hub, datasets and mechmed caches under ``tmp_path``."""
    import datasets
    import huggingface_hub.constants as hconst

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("MECHMED_CACHE", str(tmp_path / "mechmed"))
    monkeypatch.setattr(hconst, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets")
    return tmp_path / "hub"


def test_hub_dataset_with_stored_images_offline(offline_hub: Path, tmp_path: Path) -> None:
    """``--data hf:OWNER/NAME`` reads a hub dataset from the hub cache without the network; images
    stored in the dataset become files with the same pixels; a split is chosen or named."""
    import datasets

    from mechmed.consistency import resolve_data

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (16, 16, 3), dtype=np.uint8)) for i in range(3)]
    rows = {"original_question": ["Is there an effusion?", "Is the heart enlarged?", "Is there edema?"],
            "paraphrase": ["Any effusion?", "Is there cardiomegaly?", "Is edema seen?"],
            "label": ["yes", "no", "yes"], "image": images}
    features = datasets.Features({"original_question": datasets.Value("string"),
                                  "paraphrase": datasets.Value("string"), "label": datasets.Value("string"),
                                  "image": datasets.Image()})
    ds = datasets.Dataset.from_dict(rows, features=features)
    _hub_cache_dataset(offline_hub, "lab/cxr-pairs", {
        "data/test-00000-of-00001.parquet": lambda p: ds.to_parquet(str(p)),
        "data/train-00000-of-00001.parquet": lambda p: ds.select([0]).to_parquet(str(p)),
    })
    pairs = resolve_data("hf:lab/cxr-pairs")  # two splits: test is taken
    assert [p.question for p in pairs] == rows["original_question"]
    assert [p.answer for p in pairs] == rows["label"]
    assert [p.id for p in pairs] == [f"lab/cxr-pairs/default:{i}" for i in (1, 2, 3)]
    for p, img in zip(pairs, images):
        assert Path(p.image).is_file() and Path(p.image).parent == tmp_path / "mechmed" / "hub_images"
        assert np.array_equal(np.asarray(Image.open(p.image).convert("RGB")), np.asarray(img))
    assert len(resolve_data("hf:lab/cxr-pairs@train")) == 1
    with pytest.raises(MechmedError, match="lab/not-cached.*HF_HUB_OFFLINE"):
        resolve_data("hf:lab/not-cached")


def test_hub_dataset_image_paths_and_splits(offline_hub: Path, tmp_path: Path) -> None:
    """Image columns of paths resolve under --image-root; a dataset without a test split names its splits."""
    from mechmed.consistency import resolve_data

    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("L", (8, 8), 5).save(root / "a.png")
    line = json.dumps({"question": "Is there edema?", "paraphrase": "Is edema seen?", "answer": "no",
                       "image": "a.png"}) + "\n"
    _hub_cache_dataset(offline_hub, "lab/paths", {"data/train.jsonl": lambda p: p.write_text(line),
                                                  "data/validation.jsonl": lambda p: p.write_text(line)})
    with pytest.raises(MechmedError, match="has splits train, validation; name one, e.g. hf:lab/paths@train"):
        resolve_data("hf:lab/paths", image_root=root)
    (pair,) = resolve_data("hf:lab/paths@validation", image_root=root)
    assert Path(pair.image) == root / "a.png" and pair.answer == "no"
    # training pairs come from the train split unless a split is named, never from test
    assert resolve_data("hf:lab/paths", image_root=root, split="train")[0].id.startswith("lab/paths/default:")
    with pytest.raises(MechmedError, match="has splits train, validation, no 'test'"):
        resolve_data("hf:lab/paths@test", image_root=root)
    with pytest.raises(MechmedError, match="OWNER/NAME"):
        resolve_data("hf:psf-med")


# --- property: arbitrary lines only ever raise MechmedError ----------------------------------

_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 3), st.floats(allow_nan=True), st.text(max_size=12),
                    st.sampled_from(["yes", "No", "true", "0", "a.png", "bad.png", "", "..", "/"]),
                    st.lists(st.integers(), max_size=2))
_objects = st.dictionaries(st.sampled_from([*FIELDS, "original_question", "label", "extra", "misc"]), _values,
                           max_size=8).map(json.dumps)
_near_valid = st.fixed_dictionaries(
    {"question": st.one_of(st.just("Is there edema?"), _values),
     "paraphrase": st.one_of(st.just("Is edema seen?"), _values),
     "answer": st.one_of(st.sampled_from(["yes", "No", 1, False, "true"]), _values),
     "image": st.sampled_from(["a.png", "bad.png", "missing.png", "a"])},
    optional={"id": st.one_of(st.sampled_from(["x", "y", 3]), _values), "phenomenon": _values,
              "paraphrase_answer": _values, "extra": st.one_of(_values, st.just({"k": 1}))},
).map(json.dumps)
_lines = st.lists(st.one_of(st.text(max_size=40), _objects, _near_valid), max_size=6)


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=_lines, suffix=st.sampled_from([".jsonl", ".csv"]), require=st.booleans())
def test_arbitrary_lines_raise_only_mechmed_error(lines: list[str], suffix: str, require: bool) -> None:
    with tempfile.TemporaryDirectory() as d:
        png(Path(d) / "a.png")
        (Path(d) / "bad.png").write_bytes(b"\x89PNG broken")
        path = Path(d) / f"data{suffix}"
        path.write_bytes("\n".join(lines).encode("utf-8", "surrogatepass"))
        try:
            pairs = load_pairs(path, require_images=require)
        except MechmedError as e:
            assert path.name in str(e) or "image_root" in str(e)
        else:
            assert pairs and all(isinstance(p, ParaphrasePair) and p.answer in ("yes", "no") for p in pairs)


def test_text_only_pairs_have_no_image_column(tmp_path: Path) -> None:
    """A file with no image column is text-only pairs (for a text-only model); once a file has
    images, every row needs one, and the first row without names itself."""
    text = [{"question": "Is there edema?", "paraphrase": "Is edema seen?", "answer": "no"},
            {"question": "Is the heart enlarged?", "paraphrase": "Is there cardiomegaly?", "answer": "yes"}]
    path = tmp_path / "text.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in text))
    pairs = load_pairs(path)
    assert [p.image for p in pairs] == [None, None] and pairs[1].answer == "yes"
    csv_path = tmp_path / "text.csv"
    csv_path.write_text("question,paraphrase,answer\nIs there edema?,Is edema seen?,no\n")
    assert load_pairs(csv_path)[0].image is None
    Image.new("L", (8, 8)).save(tmp_path / "a.png")
    for rows, line in ((text[:1] + [{**text[1], "image": "a.png"}], 1), ([{**text[0], "image": "a.png"}, text[1]], 2)):
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        with pytest.raises(MechmedError, match=rf"line {line}: no image .*no image column at all"):
            load_pairs(path)
    with pytest.raises(MechmedError, match="line 2: no image"):  # a CSV's header is line 1
        load_pairs(csv_path, require_images=True)


# --- the PSF-Med MIMIC JSON and FlipLens PadChest CSV layouts ------------------------------------


def test_psf_med_mimic_json_gives_one_pair_per_paraphrase(data_dir: Path) -> None:
    items = [
        {"question_id": "m1", "original_question": "Is there a pleural effusion?", "answer": "Yes",
         "filename": "images/a.png", "question_type": "effusion",
         "paraphrases": [{"text": "Is pleural fluid present?", "phenomenon": "lexical substitution"},
                         {"text": "Does the film show an effusion?", "phenomenon": "syntactic_restructuring"}]},
        {"question_id": "m2", "original_question": "Is the heart enlarged?", "answer": "no",
         "filename": "images/b", "question_type": "cardiomegaly",
         "paraphrases": ["Is there cardiomegaly?"]},
    ]
    path = data_dir / "mimic.json"
    path.write_text(json.dumps(items, indent=1), encoding="utf-8")
    pairs = load_pairs(path)
    assert [(p.id, p.question_id, p.paraphrase, p.answer, p.phenomenon, p.image.name) for p in pairs] == [
        ("m1-1", "m1", "Is pleural fluid present?", "yes", "lexical_substitution", "a.png"),
        ("m1-2", "m1", "Does the film show an effusion?", "yes", "syntactic_restructuring", "a.png"),
        ("m2-1", "m2", "Is there cardiomegaly?", "no", "other", "b.png"),
    ]
    assert all(not p.negated and p.question == items[int(p.question_id[1]) - 1]["original_question"] for p in pairs)
    assert pairs[0].extra == {"question_type": "effusion"}
    # a malformed item names the item and the paraphrase
    items[1]["paraphrases"] = [{"phenomenon": "scope"}]
    path.write_text(json.dumps(items), encoding="utf-8")
    with pytest.raises(MechmedError, match=r"mimic\.json, item 2, paraphrase 1: expected"):
        load_pairs(path)
    path.write_text('{"question_id": "m1"}', encoding="utf-8")
    with pytest.raises(MechmedError, match=r"mimic\.json: expected a JSON array"):
        load_pairs(path)
    path.write_text('[{"question_id": "m1",', encoding="utf-8")
    with pytest.raises(MechmedError, match=r"mimic\.json, line 1: malformed JSON"):
        load_pairs(path)


def test_fliplens_padchest_csv_reads_a_false_op_match_as_negated(data_dir: Path) -> None:
    path = data_dir / "padchest.csv"
    path.write_text(
        "question_id,image_path,ground_truth,original_question,paraphrase,phenomenon,op_match\n"
        "q1,images/a.png,yes,Is there a pleural effusion?,Is pleural fluid present?,lexical,True\n"
        "q1,images/a.png,yes,Is there a pleural effusion?,Is there no pleural effusion?,negation,False\n"
        "q2,images/b.png,no,Is there a nodule?,Is a nodule absent?,negation,false\n"
        "q2,images/b.png,no,Is there a nodule?,Any nodule?,ellipsis,\n", encoding="utf-8")
    pairs = load_pairs(path)
    assert [(p.question_id, p.answer, p.expected_paraphrase, p.negated, p.image.name) for p in pairs] == [
        ("q1", "yes", "yes", False, "a.png"), ("q1", "yes", "no", True, "a.png"),
        ("q2", "no", "yes", True, "b.png"), ("q2", "no", "no", False, "b.png")]
    assert all("op_match" not in p.extra for p in pairs[:3])
    path.write_text("question_id,image_path,ground_truth,original_question,paraphrase,op_match\n"
                    "q1,images/a.png,yes,Is there an effusion?,Any effusion?,maybe\n", encoding="utf-8")
    msg = raises_at(path, 2)
    assert "op_match is 'maybe'" in msg and "true" in msg and "false" in msg
    path.write_text("question_id,image_path,ground_truth,original_question,paraphrase,paraphrase_answer,op_match\n"
                    "q1,images/a.png,yes,Is there an effusion?,Any effusion?,yes,false\n", encoding="utf-8")
    assert "disagrees with paraphrase_answer" in raises_at(path, 2)
