"""GGUF checkpoints as a model source: a ``.gguf`` file, dequantised once into a safetensors directory.

transformers reads GGUF files itself (``from_pretrained(dir, gguf_file=...)``, with the ``gguf``
package installed: ``pip install 'mechmed[gguf]'``), dequantising every tensor to float32. That
takes tens of seconds for a small model and minutes for MedGemma-4B, so mechmed does it once and
keeps the result under its cache, keyed by the file's SHA-256:
``$MECHMED_CACHE/gguf/<sha256[:16]>/`` holds ``config.json``, ``model.safetensors``, the tokenizer
and ``gguf_source.json`` (the file it came from, its SHA-256 and quantisation type). Every later
load reads that directory in seconds. The provenance is recorded in the metadata of every run on
the model (``model_provenance``) and beside adapters trained on it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

from mechmed.errors import MechmedError

log = logging.getLogger(__name__)

#: The provenance file of a dequantised GGUF checkpoint directory.
SOURCE_FILE = "gguf_source.json"
#: Bumped when the way a checkpoint is written changes (it keys the cache with the file's hash).
FORMAT_VERSION = 1


def is_gguf(name: str | os.PathLike) -> bool:
    return str(name).lower().endswith(".gguf")


def file_sha256(path: Path) -> str:
    """SHA-256 of ``path``, remembered per (path, size, mtime) in the cache's index so that a large
    file is hashed once."""
    from mechmed.io import write_json
    from mechmed.runtime import cache_root

    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_root() / "gguf" / "hashes.json"
    index = {}
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            index = {}
    if key in index:
        return index[key]
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    index[key] = digest.hexdigest()
    index_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(index_path, index)
    return index[key]


def quantisation(path: Path) -> str:
    """The GGUF file's quantisation type as llama.cpp names it (e.g. ``Q4_K_M``), from its
    ``general.file_type`` field; ``unknown`` when the file does not say."""
    import gguf

    reader = gguf.GGUFReader(str(path))
    field = reader.fields.get("general.file_type")
    if field is None:
        return "unknown"
    value = int(field.parts[field.data[0]][0])
    try:
        return gguf.LlamaFileType(value).name.removeprefix("MOSTLY_")
    except ValueError:
        return f"file_type {value}"


def read_source(checkpoint: str | os.PathLike) -> dict | None:
    """The provenance of a dequantised GGUF checkpoint directory, or None for any other directory."""
    path = Path(checkpoint) / SOURCE_FILE
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def gguf_checkpoint(file: str | os.PathLike, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """The safetensors checkpoint directory of GGUF ``file``, dequantised on first use (see the module doc)."""
    from mechmed.io import follow_umask, temp_dir, write_json
    from mechmed.runtime import cache_root, hf_progress_bars

    file = Path(file).expanduser()
    if not file.is_file():
        raise MechmedError(f"--model {file}: no such GGUF file; give the path of a .gguf file")
    digest = file_sha256(file)
    root = cache_root(cache_dir) / "gguf"
    final = root / f"{digest[:16]}-v{FORMAT_VERSION}"
    if (final / SOURCE_FILE).is_file():
        return final
    try:
        import gguf  # noqa: F401  (transformers reads GGUF through it)
    except ImportError:
        raise MechmedError(f"--model {file}: reading GGUF needs the gguf package; pip install 'mechmed[gguf]'") \
            from None
    import torch
    import transformers

    from mechmed.families import get_family

    quant = quantisation(file)
    log.info("dequantising %s (%s) into %s, once", file.name, quant, final)
    kw = {"gguf_file": file.name, "local_files_only": True}
    try:  # transformers draws its own bar over the tensors it dequantises
        with hf_progress_bars(enabled=True):
            tokenizer = transformers.AutoTokenizer.from_pretrained(str(file.parent), **kw)
            model = transformers.AutoModelForCausalLM.from_pretrained(str(file.parent), dtype=torch.float32, **kw)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise MechmedError(f"--model {file}: transformers cannot read this GGUF file "
                           f"({(str(e).splitlines() or [type(e).__name__])[0]})") from e
    model.config.architectures = [type(model).__name__]  # GGUF configs name none; the family is read from it
    # the tensors are float32 now: what transformers keeps of the GGUF "quantisation" would stop
    # save_pretrained and make the copy look quantised to peft
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    get_family(model.config)  # an architecture mechmed does not know fails here, before anything is written
    root.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir(root, prefix=f".{digest[:16]}-")
    try:
        with hf_progress_bars(enabled=False):
            model.save_pretrained(str(tmp), safe_serialization=True)
            tokenizer.save_pretrained(str(tmp))
        follow_umask(tmp)
        write_json(tmp / SOURCE_FILE, {"format": "gguf", "file": str(file.resolve()), "sha256": digest,
                                       "quantisation": quant, "size_bytes": file.stat().st_size,
                                       "architecture": type(model).__name__,
                                       "transformers": transformers.__version__, "format_version": FORMAT_VERSION})
        os.replace(tmp, final)
    except FileExistsError:  # another process finished first: its copy is the same
        pass
    except OSError as e:
        if not (final / SOURCE_FILE).is_file():
            raise MechmedError(f"--model {file}: cannot write the dequantised copy under {root} ({e})") from e
    finally:
        if tmp.exists():
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)
    return final


def gguf_path(model: str, gguf_file: str | None, *, revision: str | None = None, cache_dir: str | None = None,
              local_files_only: bool | None = None) -> str:
    """``--model`` with ``--gguf-file``: the file in a local directory, or downloaded from a hub
    repository (into Hugging Face's cache); ``model`` unchanged without ``gguf_file``."""
    if gguf_file is None:
        return model
    if not is_gguf(gguf_file):
        raise MechmedError(f"--gguf-file {gguf_file}: name a .gguf file")
    local = Path(model).expanduser()
    if local.is_dir():
        path = local / gguf_file
        if not path.is_file():
            raise MechmedError(f"--gguf-file {gguf_file}: not in {local}; choose one of "
                               f"{', '.join(sorted(p.name for p in local.glob('*.gguf'))) or 'none (no .gguf files there)'}")
        return str(path)
    from huggingface_hub import hf_hub_download

    from mechmed.runtime import hub_offline

    offline = hub_offline() if local_files_only is None else local_files_only
    try:
        return hf_hub_download(model, gguf_file, revision=revision, cache_dir=cache_dir, local_files_only=offline)
    except Exception as e:  # not cached offline, no network, gated, no such file
        raise MechmedError(f"--model {model} --gguf-file {gguf_file}: cannot get the file "
                           f"({type(e).__name__}: {(str(e).splitlines() or [''])[0]})") from e
