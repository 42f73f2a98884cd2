"""Atomic file output: write to a temporary name beside the target, then rename.

A reader (or a crash) never sees a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mechmed.errors import MechmedError


def ensure_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create ``path`` (and parents); raise a clear error if it cannot be written."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise MechmedError(f"{option} {path}: cannot create directory ({e.strerror}); choose a writable path") from e
    if not os.access(path, os.W_OK):
        raise MechmedError(f"{option} {path}: directory is not writable; choose a writable path")
    return path


@contextmanager
def rollback_on_error(out: str | os.PathLike) -> Iterator[None]:
    """On a :class:`MechmedError` inside the block, remove what the block added under ``out``.

    Files and directories that were there before stay; so a run that fails on bad input leaves its
    output directory as it found it (or absent), never half-written.
    """
    out = Path(out)
    existed = out.exists()
    before = {p for p in out.rglob("*")} if existed else set()
    try:
        yield
    except MechmedError:
        if not existed:
            if out.is_dir() and not out.is_symlink():
                shutil.rmtree(out, ignore_errors=True)
            elif out.exists():
                out.unlink()
        elif out.is_dir():
            for p in sorted(set(out.rglob("*")) - before, key=lambda q: len(q.parts), reverse=True):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it onto ``path`` (readable as the
    user's umask says, like any file the user writes: mkstemp alone would leave it owner-only)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    os.chmod(tmp, file_mode())
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def temp_dir(parent: str | os.PathLike, prefix: str, suffix: str = "") -> Path:
    """A new directory under ``parent`` to build in and rename into place, with the mode the user's
    umask gives a directory (mkdtemp alone would leave it owner-only)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=parent))
    os.chmod(tmp, 0o777 & ~_umask())
    return tmp


@contextmanager
def build_lock(final: str | os.PathLike) -> Iterator[None]:
    """Hold an inter-process lock for building the cache entry ``final`` (a ``.NAME.lock`` file beside
    it): two processes asking for the same missing entry build it once, the second waits and then
    finds it complete (check again inside the block)."""
    from filelock import FileLock

    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f".{final.name}.lock")):
        yield


def file_mode() -> int:
    """The mode the user's umask gives a new file."""
    return 0o666 & ~_umask()


def follow_umask(root: str | os.PathLike) -> None:
    """Give every file under ``root`` (or ``root`` itself, a file) the mode the user's umask gives a
    new file: libraries that write through temporary files, as safetensors does, leave them owner-only."""
    root, mode = Path(root), file_mode()
    for path in [root] if root.is_file() else root.rglob("*"):
        if path.is_file():
            os.chmod(path, mode)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:
        return _jsonable(obj.item())
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write JSON atomically; non-finite floats become ``null``."""
    return write_text(path, json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n")


def write_jsonl(path: str | os.PathLike, rows: list[dict]) -> Path:
    return write_text(path, "".join(json.dumps(_jsonable(r)) + "\n" for r in rows))


def read_utf8(path: str | os.PathLike) -> str:
    """A text file as UTF-8 (a BOM dropped); bytes that are not UTF-8 are an error naming the line."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise MechmedError(f"{path}, line {line}: not UTF-8 text ({e.reason}); save the file as UTF-8") from e


def iter_jsonl(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """(line number, value) of each non-blank line of a JSON-lines file; a bad line is an error naming it."""
    for number, line in enumerate(read_utf8(path).split("\n"), start=1):
        line = line.strip()
        if not line:
            continue
        try:
            yield number, json.loads(line)
        except RecursionError as e:
            raise MechmedError(f"{path}, line {number}: JSON nested too deeply; write one flat object per line"
                               ) from e
        except ValueError as e:  # JSONDecodeError, and ints too long to convert
            reason = e.msg if isinstance(e, json.JSONDecodeError) else str(e)
            raise MechmedError(f"{path}, line {number}: malformed JSON ({reason}); write one JSON object per "
                               "line") from e


def read_jsonl(path: str | os.PathLike, what: str = "file") -> list:
    """The values of a JSON-lines file (:func:`iter_jsonl`), or an error naming ``what`` when it is missing."""
    if not Path(path).is_file():
        raise MechmedError(f"{what} {path}: not found; check the path")
    return [value for _, value in iter_jsonl(path)]


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    path = Path(path)
    if not path.is_file():
        raise MechmedError(f"{what} {path}: not found; check the path")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MechmedError(f"{what} {path}: not valid JSON ({e}); re-create it") from e
