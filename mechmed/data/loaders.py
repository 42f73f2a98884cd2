"""Read and write paraphrase pairs: JSON lines, CSV/TSV, a JSON array (PSF-Med's MIMIC file, one
question with its list of paraphrases per item), and the PSF-Med hub layout.

:func:`load_pairs` reads a local file into :class:`~mechmed.data.records.ParaphrasePair` records,
:func:`load_psf_med` reads PSF-Med (``saillab/psf-med`` on the hub, or local files in its layout)
through ``datasets``, and :func:`write_pairs` writes JSON lines that :func:`load_pairs` reads back.

Column names: each of our fields is looked up under the names in :data:`ALIASES`, in order (the
first one present wins); ``columns={"question": "orig_q"}`` replaces the list for a field by one
name. Columns that no field takes go into ``extra``. Answers are normalised to ``"yes"``/``"no"``
(also from true/false and 1/0, any case). Every bad row raises
:class:`~mechmed.errors.MechmedError` naming the file and its line (JSON lines: the line; CSV: the
line the row starts on, the header being line 1) and what to change.

``datasets`` and PIL are imported inside the functions that need them.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mechmed.data.records import ParaphrasePair
from mechmed.errors import MechmedError
from mechmed.io import iter_jsonl, read_utf8

logger = logging.getLogger(__name__)

FIELDS = ("id", "question", "paraphrase", "answer", "image", "paraphrase_answer", "phenomenon", "source",
          "question_id", "counterfactual_image")
"""Our field names (the keys of ``columns=``), in the order :class:`ParaphrasePair` declares them."""

REQUIRED = ("question", "paraphrase", "answer")

ALIASES: dict[str, tuple[str, ...]] = {
    "id": ("id", "pair_id", "sample_id", "uid"),
    "question": ("question", "original_question", "question_original", "original"),
    "paraphrase": ("paraphrase", "paraphrased_question", "paraphrase_question", "rephrased_question",
                   "paraphrased"),
    "answer": ("answer", "label", "ground_truth", "gt_answer", "original_answer", "gt"),
    "image": ("image", "image_path", "img_path", "image_file", "file_name", "filename", "dicom_id",
              "image_id"),
    "paraphrase_answer": ("paraphrase_answer", "paraphrased_answer", "paraphrase_label",
                          "expected_paraphrase_answer"),
    "phenomenon": ("phenomenon", "paraphrase_type", "phenomenon_type", "linguistic_phenomenon"),
    "source": ("source", "dataset"),
    "question_id": ("question_id", "qid", "original_question_id", "group_id"),
    "counterfactual_image": ("counterfactual_image", "counterfactual_image_path"),
}
"""Column names tried for each field, in order, when ``columns`` does not name one. The first name
of each tuple is the field itself; the rest are common spellings (PSF-Med-like files)."""

SUFFIXES = {".jsonl": "jsonl", ".json": "json", ".csv": ",", ".tsv": "\t"}
ANSWER_WORDS = {"yes": "yes", "no": "no", "true": "yes", "false": "no", "1": "yes", "0": "no",
                "1.0": "yes", "0.0": "no"}
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""Tried in turn when an image name has no suffix (a MIMIC ``dicom_id``, say)."""

PSF_MED_REPO = "saillab/psf-med"
PSF_MED_CONFIGS = ("mimic", "padchest", "vindr")
YESNO_COLUMN = "is_yesno"

OP_MATCH = "op_match"
"""A column saying whether the paraphrase keeps the question's answer (FlipLens's PadChest CSV): a false
``op_match`` makes the pair answer-inverting (``paraphrase_answer`` the opposite answer)."""
PARAPHRASE_LIST = "paraphrases"
"""In a JSON array, an item's list of paraphrases (``{"text", "phenomenon"}`` objects or strings), each
one pair with the item's question, answer and image (PSF-Med's MIMIC file)."""

_ABSENT = object()
_TRUE_WORDS = {"1", "true", "yes", "on"}


# ---------------------------------------------------------------------------------------------
# column mapping


def _column_candidates(columns: Mapping[str, str] | str | None) -> dict[str, tuple[str, ...]]:
    """Per field, the column names to try: ``columns[field]`` alone if given, else the aliases."""
    if columns is None:
        columns = {}
    elif isinstance(columns, str):
        columns = _parse_columns(columns)
    if not isinstance(columns, Mapping):
        raise MechmedError(f"columns={columns!r}: give a mapping from our field names to your column names, "
                           "e.g. {'question': 'original_question'}")
    unknown = [k for k in columns if k not in FIELDS]
    if unknown:
        raise MechmedError(
            f"columns: unknown field(s) {', '.join(map(repr, unknown))}; the keys are our field names "
            f"({', '.join(FIELDS)}) and the values your column names, e.g. {{'question': 'original_question'}}")
    seen: dict[str, str] = {}
    for f, col in columns.items():
        if not isinstance(col, str) or not col:
            raise MechmedError(f"columns[{f!r}]={col!r}: give the column name as a non-empty string")
        if col in seen:
            raise MechmedError(f"columns: column {col!r} is mapped to both {seen[col]!r} and {f!r}; map it once")
        seen[col] = f
    return {f: (columns[f],) if f in columns else ALIASES[f] for f in FIELDS}


def _parse_columns(text: str) -> dict[str, str]:
    """``"question=orig_q,answer=label"`` -> ``{"question": "orig_q", "answer": "label"}``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise MechmedError(f"columns {text!r}: write field=column pairs separated by commas, "
                               "e.g. 'question=original_question,answer=label'")
        out[key.strip()] = value.strip()
    return out


# ---------------------------------------------------------------------------------------------
# images


def _is_file(p: Path) -> bool:
    try:
        return p.is_file()
    except (OSError, ValueError):  # name too long, embedded NUL, ...
        return False


class _ImageResolver:
    """Turns an image value into a path: absolute kept; else under ``base``; optionally by name.

    With ``by_name`` (PSF-Med), an image not found at ``base / value`` is looked up by its file name
    (or, without a suffix, its stem) anywhere under ``base``; the index is built on first need.
    """

    def __init__(self, base: Path, by_name: bool = False):
        self.base = base
        self.by_name = by_name
        self._index: dict[str, list[Path]] | None = None

    def _build_index(self) -> dict[str, list[Path]]:
        logger.info("indexing images under %s", self.base)
        index: dict[str, list[Path]] = {}
        for dirpath, _, names in os.walk(self.base):
            for n in names:
                p = Path(dirpath, n)
                index.setdefault(n, []).append(p)
                stem = Path(n).stem
                if stem != n:
                    index.setdefault("stem:" + stem, []).append(p)
        return index

    def __call__(self, value: str, where: str) -> Path:
        p = Path(value)
        cand = p if p.is_absolute() else self.base / p
        cand = Path(os.path.abspath(cand))
        if _is_file(cand):
            return cand
        if not cand.suffix:
            for ext in IMAGE_SUFFIXES:
                alt = cand.with_name(cand.name + ext)
                if _is_file(alt):
                    return alt
        if self.by_name and not p.is_absolute() and p.name:
            if self._index is None:
                self._index = self._build_index()
            hits = self._index.get(p.name, []) or ([] if p.suffix else self._index.get("stem:" + p.name, []))
            if len(hits) == 1:
                return Path(os.path.abspath(hits[0]))
            if len(hits) > 1:
                shown = ", ".join(str(h) for h in hits[:3])
                raise MechmedError(f"{where}: image {value!r} matches {len(hits)} files under {self.base} "
                                   f"({shown}); give the image as a path relative to image_root")
        return cand


def _check_image(path: Path, where: str, value: str) -> None:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
    except Exception as e:  # PIL raises many types for broken files
        raise MechmedError(f"{where}: image {value!r} ({path}) cannot be opened by PIL "
                           f"({type(e).__name__}: {e}); replace the file with a valid PNG/JPEG, "
                           "or pass check_images=False") from e


# ---------------------------------------------------------------------------------------------
# one row -> one record


@dataclass
class _Reader:
    """What converting rows needs: column candidates, image resolution, flags, ids seen so far."""

    candidates: dict[str, tuple[str, ...]]
    resolve: _ImageResolver
    image_hint: str
    require_images: bool | None
    """True: every row has an image; False: images optional; None: a file either gives every row
    an image or has no image column at all (text-only pairs)."""
    check_images: bool
    default_id: Callable[[int], str]
    default_source: str = ""
    seen_ids: dict[str, str] = field(default_factory=dict)
    checked: set = field(default_factory=set)
    unknown_negations: int = 0
    first_text_only: str | None = None
    image_rows: int = 0

    def row(self, row: Any, where: str, number: int) -> ParaphrasePair:
        if not isinstance(row, Mapping):
            raise MechmedError(f"{where}: expected an object with question, paraphrase and answer, got "
                               f"{_kind(row)}; write one JSON object per line")
        used: set[str] = set()
        vals: dict[str, tuple[str | None, Any]] = {}
        for f in FIELDS:
            col, value = None, _ABSENT
            for c in self.candidates[f]:
                if c in row and c not in used:
                    col, value = c, row[c]
                    used.add(c)
                    break
            vals[f] = (col, value)

        question = self._text(vals, "question", where, required=True)
        paraphrase = self._text(vals, "paraphrase", where, required=True)
        answer = self._answer(vals, "answer", where, required=True)
        paraphrase_answer = self._answer(vals, "paraphrase_answer", where, required=False)
        given = row.get(OP_MATCH) if OP_MATCH not in used else None
        if not (_is_null(given) or (isinstance(given, str) and not given.strip())):
            # FlipLens's PadChest layout: a false op_match is an answer-inverting rewrite
            used.add(OP_MATCH)
            match = _normalise_answer(given)
            if match is None:
                raise MechmedError(f"{where}: {OP_MATCH} is {_short(given)}; write true (the paraphrase keeps "
                                   "the answer) or false (it inverts it)")
            implied = answer if match == "yes" else {"yes": "no", "no": "yes"}[answer]
            if paraphrase_answer not in (None, implied):
                raise MechmedError(f"{where}: {OP_MATCH} {given!r} disagrees with paraphrase_answer "
                                   f"{paraphrase_answer!r}; keep one of them")
            paraphrase_answer = implied
        phenomenon = self._text(vals, "phenomenon", where, required=False)
        phenomenon = "_".join(phenomenon.lower().replace("-", " ").split()) if phenomenon else "other"
        source = self._text(vals, "source", where, required=False) or self.default_source
        question_id = self._ident(vals, "question_id", where) or ""
        pid = self._ident(vals, "id", where)
        if pid is None:
            pid = self.default_id(number)
        if pid in self.seen_ids:
            raise MechmedError(f"{where}: id {pid!r} is already used by {self.seen_ids[pid]}; make ids unique")
        self.seen_ids[pid] = where
        image = self._image(vals, where)
        counterfactual = self._counterfactual(vals, where) if image is not None else None
        if phenomenon == "negation_pattern" and paraphrase_answer is None:
            self.unknown_negations += 1

        extra: dict = {}
        for k, v in row.items():
            if k in used:
                continue
            if k == "extra" and isinstance(v, Mapping):
                extra.update(v)
            elif k == "extra" and isinstance(v, str) and v.strip().startswith("{"):
                try:
                    parsed = json.loads(v)
                except (ValueError, RecursionError):
                    parsed = None
                if isinstance(parsed, dict):
                    extra.update(parsed)
                else:
                    extra[k] = v
            else:
                extra[str(k)] = v
        return ParaphrasePair(id=pid, question=question, paraphrase=paraphrase, answer=answer, image=image,
                              paraphrase_answer=paraphrase_answer, phenomenon=phenomenon, source=source,
                              question_id=question_id, counterfactual_image=counterfactual, extra=extra)

    # -- field helpers -------------------------------------------------------------------------

    def _looked_for(self, f: str) -> str:
        names = ", ".join(repr(c) for c in self.candidates[f])
        return f"looked for {names}; add the column or map yours with columns={{{f!r}: 'your_column'}}"

    def _text(self, vals, f: str, where: str, *, required: bool) -> str | None:
        col, v = vals[f]
        if v is _ABSENT:
            if required:
                raise MechmedError(f"{where}: no {f} ({self._looked_for(f)})")
            return None
        if _is_null(v):
            if required:
                raise MechmedError(f"{where}: {_col(f, col)} is empty; fill it in or drop the row")
            return None
        if not isinstance(v, str):
            raise MechmedError(f"{where}: {_col(f, col)} must be text, got {_kind(v)}; quote it")
        v = v.strip()
        if not v and required:
            raise MechmedError(f"{where}: {_col(f, col)} is an empty string; fill it in or drop the row")
        return v or None

    def _ident(self, vals, f: str, where: str) -> str | None:
        col, v = vals[f]
        if v is _ABSENT or _is_null(v):
            return None
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise MechmedError(f"{where}: {_col(f, col)} must be text or an integer, got {_kind(v)}")
        v = str(v).strip()
        return v or None

    def _answer(self, vals, f: str, where: str, *, required: bool) -> str | None:
        col, v = vals[f]
        if v is _ABSENT:
            if required:
                raise MechmedError(f"{where}: no {f} ({self._looked_for(f)})")
            return None
        if _is_null(v) or (isinstance(v, str) and not v.strip()):
            if required:
                raise MechmedError(f"{where}: {_col(f, col)} is empty; write yes or no")
            return None
        norm = _normalise_answer(v)
        if norm is None:
            raise MechmedError(f"{where}: {_col(f, col)} is {_short(v)}, not a yes/no answer; write yes or no "
                               "(true/false and 1/0 are accepted too), or drop the row")
        return norm

    def _no_image(self, where: str) -> MechmedError:
        return MechmedError(f"{where}: no image ({self._looked_for('image')}); give each row an image (a file of "
                            "text-only pairs has no image column at all), or pass require_images=False")

    def _image(self, vals, where: str) -> Path | None:
        col, v = vals["image"]
        if self.require_images is None:  # text-only pairs, or every pair with an image
            if v is _ABSENT:
                if self.image_rows:
                    raise self._no_image(where)
                self.first_text_only = self.first_text_only or where
                return None
            if self.first_text_only:
                raise self._no_image(self.first_text_only)
            self.image_rows += 1
        if v is _ABSENT or _is_null(v) or (isinstance(v, str) and not v.strip()):
            if self.require_images is not False:
                what = f"{_col('image', col)} is empty" if col else f"no image ({self._looked_for('image')})"
                raise MechmedError(f"{where}: {what}; give each row an image, or pass require_images=False")
            return None
        if isinstance(v, Mapping) and isinstance(v.get("path"), str):  # a datasets Image feature, undecoded
            v = v["path"]
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str):
            raise MechmedError(f"{where}: {_col('image', col)} must be a path, got {_kind(v)}")
        v = v.strip()
        path = self.resolve(v, where)
        if not _is_file(path):
            if self.require_images is not False:
                raise MechmedError(f"{where}: image {v!r} not found (looked at {path}); {self.image_hint}, "
                                   "or pass require_images=False")
            return path
        if self.check_images and path not in self.checked:
            _check_image(path, where, v)
            self.checked.add(path)
        return path

    def _counterfactual(self, vals, where: str) -> Path | None:
        """The optional ``counterfactual_image``: resolved as ``image`` is, and it must exist."""
        col, v = vals["counterfactual_image"]
        if v is _ABSENT or _is_null(v) or (isinstance(v, str) and not v.strip()):
            return None
        if not isinstance(v, (str, os.PathLike)):
            raise MechmedError(f"{where}: {_col('counterfactual_image', col)} must be a path, got {_kind(v)}")
        v = os.fspath(v).strip()
        path = self.resolve(v, where)
        if not _is_file(path):
            raise MechmedError(f"{where}: counterfactual image {v!r} not found (looked at {path}); {self.image_hint}, "
                               "or leave the column empty")
        if self.check_images and path not in self.checked:
            _check_image(path, where, v)
            self.checked.add(path)
        return path

    def finish(self, pairs: list[ParaphrasePair], label: str) -> list[ParaphrasePair]:
        if not pairs:
            raise MechmedError(f"{label}: no rows; add paraphrase pairs (question, paraphrase, answer, image)")
        if self.unknown_negations:
            logger.warning("%s: %d negation_pattern pair(s) have no paraphrase_answer; their paraphrase is "
                           "expected to have the question's answer (add paraphrase_answer if it is the opposite)",
                           label, self.unknown_negations)
        return pairs


def _col(f: str, col: str | None) -> str:
    """``"answer"``, or ``"answer (column 'label')"`` when the file calls it something else."""
    return f if col in (None, f) else f"{f} (column {col!r})"


def _is_null(v: Any) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _normalise_answer(v: Any) -> str | None:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, (int, float)):
        return "yes" if v == 1 else "no" if v == 0 else None
    if isinstance(v, str):
        return ANSWER_WORDS.get(v.strip().rstrip(".").strip().lower())
    return None


def _kind(v: Any) -> str:
    names = {dict: "an object", list: "a list", str: "text", bool: "a boolean", int: "a number",
             float: "a number", type(None): "null"}
    return names.get(type(v), type(v).__name__)


def _short(v: Any, n: int = 40) -> str:
    r = repr(v)
    return r if len(r) <= n else r[: n - 3] + "..."


# ---------------------------------------------------------------------------------------------
# files


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict]]:
    text = read_utf8(path)
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    end = 0  # line the previous record ended on
    while True:
        try:
            cells = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise MechmedError(f"{path}, line {end + 1}: malformed CSV ({e}); check the quoting") from e
        start, end = end + 1, reader.line_num
        if not cells or (len(cells) == 1 and not cells[0].strip()):
            continue
        if header is None:
            header = [c.strip() or f"column{k + 1}" for k, c in enumerate(cells)]
            dup = sorted({h for h in header if header.count(h) > 1})
            if dup:
                raise MechmedError(f"{path}, line {start}: duplicate column name(s) {', '.join(map(repr, dup))} "
                                   "in the header; rename them")
            continue
        if len(cells) != len(header):
            raise MechmedError(f"{path}, line {start}: {len(cells)} fields but the header has {len(header)}; "
                               "quote fields that contain the delimiter")
        yield start, dict(zip(header, cells, strict=True))
    if header is None:
        raise MechmedError(f"{path}: empty (no header, no rows); add a header line and paraphrase pairs")


def _json_rows(path: Path) -> Iterator[tuple[str, str, dict]]:
    """(where, default-id number, row) of a JSON array's items; an item with a ``paraphrases`` list
    gives one row per paraphrase (``id`` ``{question_id}-{k}``, k from 1, unless the item has one)."""
    try:
        data = json.loads(read_utf8(path))
    except RecursionError as e:
        raise MechmedError(f"{path}: JSON nested too deeply; write an array of question objects") from e
    except ValueError as e:
        reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
        line = f", line {e.lineno}" if isinstance(e, json.JSONDecodeError) else ""
        raise MechmedError(f"{path}{line}: malformed JSON ({reason}); write an array of question objects") from e
    if not isinstance(data, list):
        raise MechmedError(f"{path}: expected a JSON array of question objects, got {_kind(data)}; write "
                           "[{...}, {...}] (or one object per line in a .jsonl file)")
    for i, item in enumerate(data, start=1):
        paraphrases = item.get(PARAPHRASE_LIST) if isinstance(item, Mapping) else None
        if paraphrases is None:
            yield f"item {i}", str(i), item
            continue
        if not isinstance(paraphrases, list) or not paraphrases:
            raise MechmedError(f"{path}, item {i}: {PARAPHRASE_LIST} must be a non-empty list of "
                               "{\"text\", \"phenomenon\"} objects")
        base = {k: v for k, v in item.items() if k != PARAPHRASE_LIST}
        qid = next((str(base[c]) for c in ALIASES["question_id"] if not _is_null(base.get(c))), None)
        for k, para in enumerate(paraphrases, start=1):
            where = f"item {i}, paraphrase {k}"
            if isinstance(para, str):
                para = {"text": para}
            if not isinstance(para, Mapping) or not isinstance(para.get("text"), str):
                raise MechmedError(f"{path}, {where}: expected {{\"text\": ..., \"phenomenon\": ...}}, got "
                                   f"{_short(para)}")
            row = {**base, "paraphrase": para["text"],
                   **{key: v for key, v in para.items() if key != "text"}}
            if not any(c in base for c in ALIASES["id"]) and qid is not None:
                row["id"] = f"{qid}-{k}"
            yield where, f"{i}.{k}", row


def _data_file(path: str | os.PathLike) -> Path:
    p = Path(path)
    try:
        is_dir = p.is_dir()
    except (OSError, ValueError):
        is_dir = False
    if is_dir:
        inner = p / "pairs.jsonl"
        if not inner.is_file():
            raise MechmedError(f"data directory {p}: has no pairs.jsonl; pass the data file itself")
        return inner
    if not _is_file(p):
        raise MechmedError(f"data file {p}: not found; check the path")
    if p.suffix.lower() not in SUFFIXES:
        raise MechmedError(f"data file {p}: unsupported type {p.suffix or '(no suffix)'!r}; "
                           f"use one of {', '.join(SUFFIXES)}")
    return p


def _image_base(image_root: str | os.PathLike | None, default: Path) -> Path:
    if image_root is None:
        return Path(os.path.abspath(default))
    root = Path(os.path.abspath(image_root))
    if not root.is_dir():
        raise MechmedError(f"image_root {root}: not a directory; pass the folder that holds the images")
    return root


def load_pairs(
    path: str | os.PathLike,
    *,
    image_root: str | os.PathLike | None = None,
    columns: Mapping[str, str] | str | None = None,
    require_images: bool | None = None,
    check_images: bool = True,
) -> list[ParaphrasePair]:
    """Read paraphrase pairs from a ``.jsonl``, ``.json``, ``.csv`` or ``.tsv`` file (or a directory's
    ``pairs.jsonl``).

    Besides one pair per row, two layouts in use are read as they are: PSF-Med's MIMIC JSON (an array
    of ``{question_id, original_question, answer, filename, question_type, paraphrases: [{text,
    phenomenon}]}``, one pair per paraphrase) and FlipLens's PadChest CSV (``question_id``,
    ``image_path``, ``ground_truth``, ``original_question``, ``paraphrase``, ``phenomenon``,
    ``op_match``; a false ``op_match`` is an answer-inverting rewrite).

    Args:
        path: the data file, or a directory holding ``pairs.jsonl``.
        image_root: relative image paths are taken relative to it; without it, relative to the
            data file's directory. Absolute paths are kept. A name without a suffix (a
            ``dicom_id``) also tries ``.png``, ``.jpg`` and ``.jpeg``.
        columns: our field names -> your column names (``{"question": "orig_q"}``), or the same
            as ``"question=orig_q,answer=label"``. Unmapped fields try :data:`ALIASES`.
        require_images: ``True``: every row needs an image file that exists. ``False``: missing
            images are allowed (``image`` is ``None`` when the row has none). ``None`` (the
            default): a file of text-only pairs, for a text-only model, has no image column at all;
            a file with one needs an existing image in every row.
        check_images: open every image with PIL and ``verify()`` it (each file once).

    Rows without an id get ``"{file stem}:{line}"``. A ``negation_pattern`` row without a
    paraphrase answer keeps ``paraphrase_answer=None`` (the question's answer is expected); this
    is logged, never guessed. Columns no field takes go into ``extra`` (a JSON ``extra`` object is
    merged into it).

    Raises:
        MechmedError: a missing file, or a bad row (named by file and line).
    """
    candidates = _column_candidates(columns)
    file = _data_file(path)
    base = _image_base(image_root, file.parent)
    hint = (f"check image_root={base}" if image_root is not None else
            f"image paths are relative to {base}; pass image_root= (--image-root) if they live elsewhere")
    reader = _Reader(candidates, _ImageResolver(base), hint, require_images, check_images,
                     default_id=lambda line: f"{file.stem}:{line}")
    kind = SUFFIXES[file.suffix.lower()]
    if kind == "json":
        rows = _json_rows(file)
    else:
        rows = ((f"line {line}", line, row) for line, row in (iter_jsonl(file) if kind == "jsonl" else
                                                               _csv_rows(file, kind)))
    pairs = [reader.row(row, f"{file}, {where}", number) for where, number, row in rows]
    return reader.finish(pairs, str(file))


def write_pairs(pairs: Iterable[ParaphrasePair], path: str | os.PathLike) -> Path:
    """Write ``pairs`` as JSON lines (atomically); :func:`load_pairs` reads the file back equal.

    ``path`` is a ``.jsonl`` file, or a directory (then ``pairs.jsonl`` in it). Image paths under
    the file's directory are written relative to it (POSIX separators); others stay absolute.
    Returns the path written.
    """
    from mechmed.io import write_jsonl

    out = Path(path)
    if out.is_dir():
        out = out / "pairs.jsonl"
    if out.suffix.lower() != ".jsonl":
        raise MechmedError(f"write_pairs {out}: name the file *.jsonl (load_pairs reads by suffix)")
    base = Path(os.path.abspath(out.parent))
    rows = []
    for p in pairs:
        if not isinstance(p, ParaphrasePair):
            raise TypeError(f"write_pairs expects ParaphrasePair records, got {type(p).__name__}")
        d = p.to_dict()
        for name in ("image", "counterfactual_image"):
            if getattr(p, name) is not None:
                img = Path(os.path.abspath(getattr(p, name)))
                try:
                    d[name] = img.relative_to(base).as_posix()
                except ValueError:
                    d[name] = str(img)
        rows.append(d)
    return write_jsonl(out, rows)


# ---------------------------------------------------------------------------------------------
# PSF-Med


@contextmanager
def _offline(enabled: bool) -> Iterator[None]:
    """Force ``datasets``/``huggingface_hub`` offline for the block (they read the variable at import)."""
    if not enabled:
        yield
        return
    import datasets.config as dconf
    import huggingface_hub.constants as hconst

    saved = (dconf.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE)
    dconf.HF_HUB_OFFLINE = hconst.HF_HUB_OFFLINE = True
    try:
        yield
    finally:
        dconf.HF_HUB_OFFLINE, hconst.HF_HUB_OFFLINE = saved


_BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".jsonl": "json"}


def _local_builder(data_files: Any, split: str) -> tuple[str, dict, list[str]]:
    """The ``datasets`` builder for local files, the data_files dict, and the file list (for messages)."""
    import glob

    spec = data_files if isinstance(data_files, Mapping) else {split: data_files}
    if split not in spec:
        raise MechmedError(f"data_files has splits {', '.join(map(repr, spec))} but split={split!r}; "
                           "pass split= one of them")
    files = spec[split]
    files = [files] if isinstance(files, (str, os.PathLike)) else list(files)
    if not files:
        raise MechmedError(f"data_files for split {split!r} is empty; pass parquet/csv/json file paths")
    found: list[str] = []
    for f in map(os.fspath, files):
        hits = sorted(glob.glob(f)) if glob.has_magic(f) else ([f] if os.path.isfile(f) else [])
        if not hits:
            raise MechmedError(f"data file {f}: not found; check the path")
        found.extend(hits)
    kinds = {_BUILDERS.get(Path(f).suffix.lower()) for f in found}
    if None in kinds or len(kinds) != 1:
        raise MechmedError(f"data_files {', '.join(found)}: use files of one type, {', '.join(_BUILDERS)}")
    return kinds.pop(), {split: found}, found


def _truthy(v: Any) -> bool:
    if isinstance(v, str):
        return v.strip().lower() in _TRUE_WORDS
    return bool(v) and not _is_null(v)


def load_psf_med(
    config: str = "mimic",
    split: str = "test",
    *,
    image_root: str | os.PathLike | None,
    columns: Mapping[str, str] | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    data_files: Any = None,
    require_images: bool = True,
    check_images: bool = True,
    revision: str | None = None,
) -> list[ParaphrasePair]:
    """Read PSF-Med (``saillab/psf-med``: configs mimic / padchest / vindr, split test) into pairs.

    Args:
        config, split: the hub configuration and split. With ``data_files`` the config only
            labels the records (``source="psf-med/{config}"``, default ids ``psf-med/{config}:{row}``).
        image_root: the folder holding the images (PhysioNet / BIMCV downloads). Each row's image
            is looked for at ``image_root / value``, then by file name (or, without a suffix, by
            stem) anywhere under ``image_root``.
        columns: as in :func:`load_pairs`.
        cache_dir: the ``datasets`` cache.
        local_files_only: no network (use the cache). ``None`` follows ``HF_HUB_OFFLINE``; with
            that variable set the hub is never contacted whatever this says.
        data_files: local parquet / csv / json(l) files in the hub layout (a path, a list, a glob
            or ``{split: files}``) instead of the hub.
        require_images, check_images: as in :func:`load_pairs`.
        revision: the hub revision (branch, tag or commit).

    Only rows whose ``is_yesno`` is true are kept when that column exists. Row numbers in
    messages count all rows of the split from 1. ``trust_remote_code`` is never used.

    Raises:
        MechmedError: the data set cannot be reached or read, or a kept row is bad.
    """
    if data_files is None and config not in PSF_MED_CONFIGS:
        raise MechmedError(f"config={config!r}: PSF-Med has {', '.join(PSF_MED_CONFIGS)}")
    if image_root is None and require_images:
        raise MechmedError("load_psf_med: pass image_root= the folder holding the PSF-Med images "
                           "(PhysioNet / BIMCV downloads), or require_images=False")
    return _hub_pairs(PSF_MED_REPO, config, split, image_root=image_root, columns=columns, cache_dir=cache_dir,
                      local_files_only=local_files_only, data_files=data_files, require_images=require_images,
                      check_images=check_images, revision=revision, label_name="psf-med")


def load_hub_pairs(
    repo_id: str,
    config: str | None = None,
    split: str | None = None,
    *,
    image_root: str | os.PathLike | None = None,
    columns: Mapping[str, str] | str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool | None = None,
    revision: str | None = None,
    require_images: bool | None = None,
    check_images: bool = True,
) -> list[ParaphrasePair]:
    """Read paraphrase pairs from a Hugging Face hub dataset (``--data hf:OWNER/NAME[:CONFIG][@SPLIT]``).

    The columns are read as :func:`load_pairs` reads a file's (``columns`` maps yours). An image
    column holds paths (under ``image_root``, else absolute) or images stored in the dataset
    (``datasets.Image``), which are written once under mechmed's cache
    (:func:`mechmed.runtime.cache_root`, ``hub_images/``) so that each pair names a file.
    ``split`` defaults to the dataset's only split, else ``test`` (``--data``, ``eval_data``); a
    training config's ``train_data`` defaults to ``train``.

    Offline (``local_files_only`` or ``HF_HUB_OFFLINE``/``HF_DATASETS_OFFLINE``) the hub is never
    contacted: the dataset comes from ``datasets``' cache of an earlier load, else from the
    snapshot that huggingface_hub keeps in its cache (``hf download --repo-type dataset``).
    ``trust_remote_code`` is never used.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise MechmedError(f"--data hf:{repo_id}: name a hub dataset as OWNER/NAME, e.g. hf:saillab/psf-med:mimic")
    if repo_id == PSF_MED_REPO:
        return load_psf_med(config or "mimic", split or "test", image_root=image_root, columns=columns,
                            cache_dir=cache_dir, local_files_only=local_files_only, revision=revision,
                            require_images=require_images, check_images=check_images)
    return _hub_pairs(repo_id, config, split, image_root=image_root, columns=columns, cache_dir=cache_dir,
                      local_files_only=local_files_only, data_files=None, require_images=require_images,
                      check_images=check_images, revision=revision, label_name=repo_id)


def parse_hub_data(data: str) -> tuple[str, str | None, str | None] | None:
    """``hf:OWNER/NAME[:CONFIG][@SPLIT]`` -> (repo id, config, split); anything else -> None."""
    if not isinstance(data, str) or not data.startswith("hf:"):
        return None
    rest, _, split = data[3:].partition("@")
    repo, _, config = rest.partition(":")
    return repo, config or None, split or None


def _hub_dataset(repo_id: str, config: str | None, split: str | None, *, cache_dir, revision, offline: bool):
    """The ``datasets.Dataset`` of one split of a hub dataset, and its label for messages."""
    import datasets

    kwargs = {"cache_dir": os.fspath(cache_dir) if cache_dir is not None else None, "revision": revision}
    with _offline(offline):
        try:
            loaded = datasets.load_dataset(repo_id, config, **kwargs)
        except Exception:
            if not offline:
                raise
            # not in datasets' own cache: the hub cache's snapshot (downloaded by hf / huggingface_hub)
            from huggingface_hub import snapshot_download

            local = snapshot_download(repo_id, repo_type="dataset", revision=revision, local_files_only=True)
            loaded = datasets.load_dataset(local, config)
    names = list(loaded)
    chosen = split or (names[0] if len(names) == 1 else "test" if "test" in names else None)
    if chosen not in names:
        example = f"hf:{repo_id}{':' + config if config else ''}@{names[0]}"
        raise MechmedError(f"--data hf:{repo_id}: has splits {', '.join(names)}"
                           + (f", no {split!r}" if split else "") + f"; name one, e.g. {example}")
    return loaded[chosen], f"{repo_id} ({config or 'default'}/{chosen})"


def _stored_images(ds, label: str):
    """``ds`` with its ``datasets.Image`` columns left undecoded, and a function that turns a row's
    stored images into files under mechmed's cache (each written once, named by its bytes' hash)."""
    import hashlib

    import datasets

    from mechmed.io import atomic_path
    from mechmed.runtime import cache_root

    cols = [k for k, f in ds.features.items() if isinstance(f, datasets.Image)]
    if not cols:
        return ds, lambda row: row
    root = cache_root() / "hub_images"
    logger.info("%s: images stored in the dataset (%s) are written under %s", label, ", ".join(cols), root)

    def store(value):
        if not value or value.get("bytes") is None:
            return (value or {}).get("path")
        digest = hashlib.sha256(value["bytes"]).hexdigest()[:24]
        path = root / f"{digest}{Path(value.get('path') or '').suffix.lower() or '.png'}"
        if not path.is_file():
            root.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                tmp.write_bytes(value["bytes"])
        return str(path)

    for c in cols:
        ds = ds.cast_column(c, datasets.Image(decode=False))
    return ds, lambda row: {k: store(v) if k in cols else v for k, v in row.items()}


def _hub_pairs(repo_id: str, config: str | None, split: str | None, *, image_root, columns, cache_dir,
               local_files_only, data_files, require_images, check_images, revision, label_name: str):
    """Pairs from a hub dataset (or local files in its layout): what :func:`load_psf_med` and
    :func:`load_hub_pairs` share."""
    candidates = _column_candidates(columns)
    base = Path.cwd() if image_root is None else _image_base(image_root, Path.cwd())
    from mechmed.runtime import hub_offline

    offline = bool(local_files_only) or hub_offline(datasets=True)

    import datasets

    if data_files is not None:
        split = split or "test"
        builder, spec, found = _local_builder(data_files, split)
        label = ", ".join(found) if len(found) <= 3 else f"{found[0]} and {len(found) - 1} more files"
        try:
            with _offline(offline):
                ds = datasets.load_dataset(builder, data_files=spec, split=split,
                                           cache_dir=os.fspath(cache_dir) if cache_dir is not None else None)
        except Exception as e:  # datasets/pyarrow raise many types for unreadable files
            raise MechmedError(f"data_files {label}: cannot be read as {builder} ({type(e).__name__}: {e}); "
                               "check the files") from e
    else:
        try:
            ds, label = _hub_dataset(repo_id, config, split, cache_dir=cache_dir, revision=revision, offline=offline)
        except MechmedError:
            raise
        except Exception as e:  # network, gating, auth, missing cache: all the user's to fix
            label = f"{repo_id} ({config or 'default'}/{split or 'default split'})"
            if offline:
                how = ("HF_HUB_OFFLINE is set or local_files_only=True and it is not in the cache; unset it to "
                       "download")
            elif isinstance(e, ConnectionError) and "gated" not in str(e):
                how = "the hub could not be reached; check the network"
            else:
                how = (f"if it is gated, accept its terms at https://huggingface.co/datasets/{repo_id} and "
                       "log in (hf auth login)")
            raise MechmedError(f"{label}: cannot load ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               f"{how}, or pass local copies of its files") from e
    ds, as_files = _stored_images(ds, label)
    config_name = config or "default"
    hint = f"check image_root={base}" if image_root is not None else "pass image_root= (--image-root)"
    reader = _Reader(candidates, _ImageResolver(base, by_name=image_root is not None), hint, require_images,
                     check_images, default_id=lambda row: f"{label_name}/{config_name}:{row}",
                     default_source=f"{label_name}/{config_name}")
    filtered = YESNO_COLUMN in (ds.column_names or [])
    pairs = []
    for number, row in enumerate(ds, start=1):
        if filtered and not _truthy(row.get(YESNO_COLUMN)):
            continue
        if filtered:
            row = {k: v for k, v in row.items() if k != YESNO_COLUMN}
        pairs.append(reader.row(as_files(row), f"{label}, row {number}", number))
    if not pairs and filtered and len(ds):
        raise MechmedError(f"{label}: no rows with {YESNO_COLUMN} true; this loader keeps yes/no questions only")
    return reader.finish(pairs, label)
