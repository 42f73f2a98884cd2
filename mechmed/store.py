"""Activation store: a dataset's activations streamed to disk in safetensors shards, read back lazily.

Layout of a store directory (written by :func:`write_activations`, read by :class:`ActivationStore`)::

    meta.json                    what was run: model, family, sites, positions, dtype, d_model,
                                 shard_size, and every prompt (id, text, image path); ``run_id``
                                 hashes all of it
    shard-00000.safetensors      one file per ``shard_size`` prompts, holding every site's tensor
    shard-00001.safetensors      (keys like ``resid_post.17``, ``[rows, d_model]``) and ``prompt_rows``
    ...                          (rows per prompt); its header metadata names the run and prompt range
    index.json                   shard -> prompt range and row range; ``complete`` once all are written

Rows: with ``positions="last"`` one row per prompt (the answer position), ``store[site]`` is
``[n_prompts, d_model]``. With ``"all"`` (every real token), ``"text"`` or ``"image"`` (the tokens of
:func:`~mechmed.capture.text_token_mask` / :func:`~mechmed.capture.image_token_mask`), each prompt
has a variable number of rows, in token order; :meth:`ActivationStore.rows` gives prompt i's slice.

Safety: every file is written to a temporary name beside its target, flushed to disk and renamed
(``os.replace``), so a shard exists under its own name only when it is complete, and a killed run
never leaves one that looks complete. Rerunning with the same arguments resumes: shards present are
checked (same run, same prompt range) and skipped, the rest are computed with the same batches, so
the result is identical to an uninterrupted run. Only one shard is held in memory at a time, so the
peak memory does not grow with the number of prompts. Shards are safetensors: no pickle anywhere.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from mechmed.errors import MechmedError
from mechmed.io import atomic_path, ensure_dir, follow_umask, read_json, write_json
from mechmed.sites import SITE_KINDS, Site

if TYPE_CHECKING:
    from jaxtyping import Float, Int
    from torch import Tensor

log = logging.getLogger(__name__)

FORMAT = "mechmed-activations"
VERSION = 1
STORE_POSITIONS = ("last", "all", "text", "image")
STORE_DTYPES = ("float32", "bfloat16", "float16")
META, INDEX = "meta.json", "index.json"
ROWS_KEY = "prompt_rows"


def site_key(site: Site) -> str:
    """The tensor key of ``site`` in a shard, e.g. ``resid_post.17``."""
    return f"{site.kind}.{site.layer}"


def _as_site(site) -> Site:
    """A Site from a Site, a layer number, ``resid_post:17``, a hook name or a shard key ``resid_post.17``."""
    if isinstance(site, Site):
        return site
    kind, dot, layer = str(site).partition(".")
    if dot and kind in SITE_KINDS and layer.isdigit():
        return Site(int(layer), kind)
    return Site.parse(site)


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.safetensors"


@dataclass(frozen=True)
class Prompt:
    """One prompt of a store: an id, the question text and an optional image path."""

    id: str
    text: str
    image: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def as_prompts(items: Iterable) -> list[Prompt]:
    """Prompts from paraphrase pairs (two each: ``{id}/question`` and ``{id}/paraphrase``), strings
    (ids ``0``, ``1``, ...), :class:`Prompt` objects or mappings with ``text`` (and ``id``, ``image``)."""
    from mechmed.data.records import ParaphrasePair

    out: list[Prompt] = []
    for i, item in enumerate(items):
        if isinstance(item, Prompt):
            out.append(item)
        elif isinstance(item, ParaphrasePair):
            image = None if item.image is None else str(item.image)
            out += [Prompt(f"{item.id}/question", item.question, image),
                    Prompt(f"{item.id}/paraphrase", item.paraphrase, image)]
        elif isinstance(item, str):
            out.append(Prompt(str(i), item))
        elif isinstance(item, Mapping) and isinstance(item.get("text"), str):
            image = item.get("image")
            out.append(Prompt(str(item.get("id", i)), item["text"], None if image is None else str(image)))
        else:
            raise MechmedError(f"prompt {i}: a {type(item).__name__}; give ParaphrasePair records, strings, "
                               "Prompt objects or dicts with a 'text' key")
    if not out:
        raise MechmedError("no prompts to run: the prompt list is empty")
    seen: set[str] = set()
    for p in out:
        if not p.text.strip():
            raise MechmedError(f"prompt {p.id!r}: empty text")
        if p.id in seen:
            raise MechmedError(f"prompt id {p.id!r} appears twice; give every prompt a distinct id")
        seen.add(p.id)
    return out


@dataclass
class WriteResult:
    """What :func:`write_activations` did."""

    path: Path
    n_prompts: int
    n_shards: int
    written: list = field(default_factory=list)
    """Shards computed by this call."""
    skipped: list = field(default_factory=list)
    """Shards found complete on disk and kept (a resumed run)."""
    complete: bool = False
    peak_rows: int = 0
    """Most activation rows held in memory at once (at most one shard's)."""


def _run_id(meta: dict) -> str:
    blob = json.dumps({k: v for k, v in meta.items() if k not in ("run_id",)}, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _torch_dtype(name: str):
    import torch

    return getattr(torch, name)


def _positive(value, option: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise MechmedError(f"{option}={value!r}: must be a positive integer")
    return value


def _save_file(tensors: dict, path: Path, metadata: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata=metadata)
    follow_umask(path)  # safetensors writes owner-only files


def _write_shard(path: Path, tensors: dict, metadata: dict) -> None:
    """Write a shard under a temporary name, flush it to disk, rename it into place."""
    with atomic_path(path) as tmp:
        _save_file(tensors, tmp, metadata)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())


def _shard_info(path: Path) -> dict:
    """A shard's header metadata and row counts (reads the header and the small ``prompt_rows`` only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = dict(f.metadata() or {})
            rows = f.get_tensor(ROWS_KEY).tolist()
            keys = set(f.keys())
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types
        raise MechmedError(f"shard {path}: not a readable safetensors file ({e}); delete it and rerun "
                           "write_activations to recompute it") from e
    return {"meta": meta, "rows": rows, "keys": keys}


def _check_shard(path: Path, info: dict, run_id: str, start: int, end: int) -> None:
    meta = info["meta"]
    if meta.get("run_id") != run_id or int(meta.get("prompt_start", -1)) != start or \
            int(meta.get("prompt_end", -1)) != end or len(info["rows"]) != end - start:
        raise MechmedError(f"shard {path}: belongs to another run or prompt range (run {meta.get('run_id')}, "
                           f"prompts {meta.get('prompt_start')}..{meta.get('prompt_end')}); delete it and rerun")


def _mask(bundle, inputs, positions):
    from mechmed.capture import image_token_mask, text_token_mask

    if positions == "last":
        return "last"
    if positions == "text":
        return text_token_mask(bundle, inputs)
    if positions == "image":
        return image_token_mask(bundle, inputs)
    mask = inputs.get("attention_mask")
    return inputs["input_ids"].new_ones(inputs["input_ids"].shape, dtype=bool) if mask is None else mask.bool()


def write_activations(bundle, pairs_or_prompts: Iterable, sites: Iterable[Site | str | int], out_dir, *,
                      positions: str = "last", shard_size: int = 1024, batch_size: int = 8,
                      dtype: str | None = None, backend: str = "hooks", images: bool | None = None,
                      image_root=None, max_shards: int | None = None,
                      on_shard: Callable[[int], None] | None = None, progress: str | None = None) -> WriteResult:
    """Capture ``sites`` for every prompt and write them to ``out_dir`` in safetensors shards.

    ``pairs_or_prompts``: see :func:`as_prompts`. ``positions``: ``last`` (one row per prompt),
    ``all`` (every real token), ``text`` or ``image`` tokens. ``dtype``: stored dtype (default: the
    model's). ``images``: run with each prompt's image (default: when the model takes images and the
    prompts have them). Resumable: rerun with the same arguments after an interruption.
    ``max_shards`` stops after computing that many shards; ``on_shard(k)`` is called after shard
    ``k`` is on disk (both for tests and for long jobs that checkpoint).
    """
    import torch

    from mechmed.capture import capture
    from mechmed.data.images import load_image
    from mechmed.progress import progress_bar
    from mechmed.readout import build_inputs

    prompts = as_prompts(pairs_or_prompts)
    if isinstance(sites, (Site, str, int)):
        sites = [sites]
    sites = sorted(dict.fromkeys(_as_site(s) for s in sites))
    if not sites:
        raise MechmedError("no sites to store: give at least one, e.g. resid_post:17")
    for s in sites:
        s.check(bundle.n_layers)
    if positions not in STORE_POSITIONS:
        raise MechmedError(f"positions={positions!r}: choose one of {', '.join(STORE_POSITIONS)}")
    shard_size, batch_size = _positive(shard_size, "shard_size"), _positive(batch_size, "batch_size")
    if max_shards is not None:
        _positive(max_shards, "max_shards")
    if dtype is not None and dtype not in STORE_DTYPES:
        raise MechmedError(f"dtype={dtype!r}: choose one of {', '.join(STORE_DTYPES)}")
    model_dtype = str(next(bundle.model.parameters()).dtype).removeprefix("torch.")
    dtype = dtype or (model_dtype if model_dtype in STORE_DTYPES else "float32")
    use_images = bundle.multimodal and any(p.image for p in prompts) if images is None else bool(images)
    if use_images:
        if not bundle.multimodal:
            raise MechmedError("images=True: this model takes no images; leave images unset")
        missing = [p.id for p in prompts if not p.image]
        if missing:
            raise MechmedError(f"prompt {missing[0]!r} has no image while others do ({len(missing)} without); "
                               "give every prompt an image, or pass images=False")
    if not use_images and any(p.image for p in prompts):
        log.info("running the prompts without their images (images=%s, model takes images: %s)", images,
                 bundle.multimodal)
    if positions == "image" and not use_images:
        raise MechmedError("positions='image': the prompts are run without images; use positions='text' or 'all'")

    out = ensure_dir(out_dir, "out_dir")
    n_shards = -(-len(prompts) // shard_size)
    meta = {
        "format": FORMAT, "version": VERSION, "model": bundle.name, "family": bundle.family.name,
        "sites": [str(s) for s in sites], "keys": [site_key(s) for s in sites], "positions": positions,
        "dtype": dtype, "d_model": bundle.d_model, "images": use_images, "shard_size": shard_size,
        "n_prompts": len(prompts), "n_shards": n_shards, "prompts": [p.to_dict() for p in prompts],
    }
    meta["run_id"] = run_id = _run_id(meta)
    meta_path = out / META
    if meta_path.exists():
        old = read_json(meta_path, "activation store meta")
        if old.get("run_id") != run_id:
            diff = [k for k in meta if k != "run_id" and old.get(k) != meta[k]]
            raise MechmedError(f"out_dir {out}: holds activations of another run ({', '.join(diff) or 'run_id'} "
                               "differ); choose a new directory or delete it")
    else:
        write_json(meta_path, meta)
    for stale in out.glob(".shard-*.safetensors.*.tmp"):  # left by a killed run; never a complete shard
        stale.unlink(missing_ok=True)

    store_dtype = _torch_dtype(dtype)
    result = WriteResult(out, len(prompts), n_shards)
    rows_done: dict[int, list] = {}
    todo = []
    for k in range(n_shards):
        start, end = k * shard_size, min((k + 1) * shard_size, len(prompts))
        path = out / shard_name(k)
        if path.exists():
            info = _shard_info(path)
            _check_shard(path, info, run_id, start, end)
            rows_done[k] = info["rows"]
            result.skipped.append(k)
        else:
            todo.append((k, start, end))
    if result.skipped:
        log.info("%s: %d of %d shards already written; resuming", out, len(result.skipped), n_shards)

    for k, start, end in progress_bar(todo, desc=progress, total=len(todo)):
        if max_shards is not None and len(result.written) >= max_shards:
            break
        parts: dict[Site, list] = {s: [] for s in sites}
        prompt_rows: list[int] = []
        held = 0
        for b0 in range(start, end, batch_size):
            batch = prompts[b0:min(b0 + batch_size, end)]
            imgs = [load_image(p.image, image_root) for p in batch] if use_images else None
            inputs = build_inputs(bundle.processor, [p.text for p in batch], imgs).to(bundle.device)
            mask = _mask(bundle, inputs, positions)
            acts, _ = capture(bundle, inputs, sites, backend, positions=mask)
            for s in sites:
                x = acts[s][:, 0] if positions == "last" else acts[s]
                parts[s].append(x.to("cpu", store_dtype))
            rows = [1] * len(batch) if positions == "last" else mask.sum(dim=1).tolist()
            prompt_rows += [int(r) for r in rows]
            held += sum(rows)
            result.peak_rows = max(result.peak_rows, held)
        tensors = {site_key(s): torch.cat(parts[s]).contiguous() for s in sites}
        tensors[ROWS_KEY] = torch.tensor(prompt_rows, dtype=torch.int64)
        del parts
        shard_meta = {"format": FORMAT, "run_id": run_id, "shard": str(k), "prompt_start": str(start),
                      "prompt_end": str(end), "n_rows": str(sum(prompt_rows))}
        _write_shard(out / shard_name(k), tensors, shard_meta)
        del tensors
        rows_done[k] = prompt_rows
        result.written.append(k)
        _write_index(out, run_id, n_shards, shard_size, len(prompts), rows_done)
        if on_shard is not None:
            on_shard(k)
    result.complete = len(rows_done) == n_shards
    _write_index(out, run_id, n_shards, shard_size, len(prompts), rows_done)
    return result


def _write_index(out: Path, run_id: str, n_shards: int, shard_size: int, n_prompts: int, rows_done: dict) -> None:
    shards, row = [], 0
    for k in range(n_shards):
        if k not in rows_done:
            continue
        start = k * shard_size
        n_rows = sum(rows_done[k])
        # row offsets are only known up to the first missing shard
        contiguous = all(j in rows_done for j in range(k))
        shards.append({"shard": k, "file": shard_name(k), "prompt_start": start,
                       "prompt_end": min(start + shard_size, n_prompts), "n_rows": n_rows,
                       "row_start": row if contiguous else None})
        row += n_rows
    write_json(out / INDEX, {"format": FORMAT, "run_id": run_id, "n_shards": n_shards,
                             "complete": len(rows_done) == n_shards, "shards": shards})


class ActivationStore:
    """Lazy reader of a directory written by :func:`write_activations`.

    ``store[site]`` -> ``[n_rows, d_model]`` (each shard read with safetensors ``safe_open``);
    ``store.iter_batches(site, n)`` streams it one shard at a time; ``store.prompt(i)``,
    ``store.rows(i)``, ``len(store)`` (prompts). An unfinished store raises unless ``allow_partial``
    (then only the prompts of complete leading shards are visible).
    """

    def __init__(self, path, *, allow_partial: bool = False):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MechmedError(f"activation store {self.path}: not a directory; give the out_dir of write_activations")
        meta = read_json(self.path / META, "activation store meta")
        if meta.get("format") != FORMAT:
            raise MechmedError(f"activation store {self.path}: {META} is not a mechmed activation store")
        if int(meta.get("version", 0)) > VERSION:
            raise MechmedError(f"activation store {self.path}: format version {meta['version']} is newer than this "
                               f"mechmed reads ({VERSION}); upgrade mechmed")
        self.meta = meta
        self.sites = [Site.parse(s) for s in meta["sites"]]
        n_shards, size, n = int(meta["n_shards"]), int(meta["shard_size"]), int(meta["n_prompts"])
        self._shards: list[Path] = []
        rows: list[int] = []
        for k in range(n_shards):
            p = self.path / shard_name(k)
            if not p.exists():
                if not allow_partial:
                    raise MechmedError(f"activation store {self.path}: incomplete ({k} of {n_shards} shards); rerun "
                                       "write_activations with the same arguments to resume it")
                break
            start, end = k * size, min((k + 1) * size, n)
            info = _shard_info(p)
            _check_shard(p, info, meta["run_id"], start, end)
            self._shards.append(p)
            rows += info["rows"]
        self._rows = rows
        offsets = [0]
        for r in rows:
            offsets.append(offsets[-1] + r)
        self._offsets = offsets

    @property
    def complete(self) -> bool:
        return len(self._shards) == int(self.meta["n_shards"])

    @property
    def positions(self) -> str:
        return self.meta["positions"]

    @property
    def d_model(self) -> int:
        return int(self.meta["d_model"])

    @property
    def dtype(self):
        return _torch_dtype(self.meta["dtype"])

    @property
    def n_rows(self) -> int:
        return self._offsets[-1]

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, prompts={len(self)}, rows={self.n_rows}, "
                f"sites={[str(s) for s in self.sites]}, positions={self.positions!r}, dtype={self.meta['dtype']})")

    def _key(self, site) -> str:
        s = _as_site(site)
        if s not in self.sites:
            raise MechmedError(f"site {s}: not in store {self.path} (it has {', '.join(map(str, self.sites))})")
        return site_key(s)

    def shard(self, k: int, site) -> Float[Tensor, "rows d_model"]:
        """Shard ``k``'s rows of ``site``."""
        from safetensors import safe_open

        key = self._key(site)
        if not 0 <= k < len(self._shards):
            raise MechmedError(f"shard {k}: out of range; the store has shards 0..{len(self._shards) - 1}")
        with safe_open(str(self._shards[k]), framework="pt") as f:
            return f.get_tensor(key)

    def __getitem__(self, site) -> Float[Tensor, "rows d_model"]:
        import torch

        self._key(site)
        return torch.cat([self.shard(k, site) for k in range(len(self._shards))])

    def iter_batches(self, site, batch_size: int) -> Iterator[Float[Tensor, "batch d_model"]]:
        """Rows of ``site`` in order, ``batch_size`` at a time (the last batch may be shorter),
        reading one shard at a time."""
        import torch

        _positive(batch_size, "batch_size")
        self._key(site)
        carry = None
        for k in range(len(self._shards)):
            x = self.shard(k, site)
            if carry is not None and len(carry):
                x = torch.cat([carry, x])
            n_full = len(x) // batch_size * batch_size
            for i in range(0, n_full, batch_size):
                yield x[i:i + batch_size]
            carry = x[n_full:]
        if carry is not None and len(carry):
            yield carry

    def rows(self, i: int) -> slice:
        """The rows of prompt ``i`` in ``store[site]``."""
        self._check_prompt(i)
        return slice(self._offsets[i], self._offsets[i + 1])

    def _check_prompt(self, i: int) -> None:
        if not isinstance(i, int) or not 0 <= i < len(self):
            raise MechmedError(f"prompt {i!r}: out of range; the store has prompts 0..{len(self) - 1}")

    def prompt(self, i: int) -> dict:
        """Prompt ``i``: id, text, image path, its rows and shard."""
        self._check_prompt(i)
        p = dict(self.meta["prompts"][i])
        r = self.rows(i)
        p.update(index=i, rows=(r.start, r.stop), shard=i // int(self.meta["shard_size"]))
        return p

    @property
    def prompts(self) -> list[dict]:
        return [dict(p) for p in self.meta["prompts"][:len(self)]]

    def prompt_rows(self) -> Int[Tensor, " prompts"]:
        """Rows per prompt (all 1 for ``positions='last'``)."""
        import torch

        return torch.tensor(self._rows, dtype=torch.int64)


def read_index(path) -> dict:
    """The ``index.json`` of a store directory."""
    return read_json(Path(path) / INDEX, "activation store index")
