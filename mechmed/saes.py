"""Sparse autoencoders: loading them (sae-lens), checking them against a model, and training the
embedded default's own SAEs.

**Loading.** :func:`load_sae` takes one SAE spec:

- a sae-lens pretrained pair, ``("gemma-scope-2-4b-it-res", "layer_17_width_16k_l0_big")`` or the
  strings ``RELEASE:SAE_ID`` / ``RELEASE/SAE_ID`` (downloads; a clear error when offline);
- a local sae-lens directory (``cfg.json`` + weights, as ``save_model`` writes it);
- a raw Gemma Scope ``params.safetensors`` (JumpReLU: ``w_enc``, ``w_dec``, ``b_enc``, ``b_dec``,
  ``threshold``, any case), or a directory holding one. It becomes a sae-lens ``JumpReLUSAE``.

:func:`resolve_saes` turns the ``--saes`` option into one SAE per layer:

- a source's SAEs by name (``demo``: the demo model's, trained on first use by
  :func:`mechmed.demo.saes.ensure_demo_saes`; :mod:`mechmed.sources`);
- ``DIR``: a directory with one SAE subdirectory per layer (``layer_3/``, ...), or one SAE directory;
- ``RELEASE:ID_TEMPLATE`` with ``{L}`` for the layer, e.g.
  ``gemma-scope-2-4b-it-res:layer_{L}_width_16k_l0_big``; a local path with ``{L}`` works too.

:func:`check_sae` raises a :class:`~mechmed.errors.MechmedError` when an SAE does not belong to a
Site: its ``d_in`` must be the model's width and its hook (``cfg.metadata.hook_name``, in
TransformerLens form ``blocks.17.hook_resid_post`` or a module path ``model.layers.17``) must name
the same layer and kind.

**Positions.** SAEs are trained and evaluated on the residual stream at every real token of a
prompt, text and image tokens alike, except padding and the BOS token (:func:`token_mask`): Gemma's
BOS residual is an attention-sink outlier with a norm many times the others, which Gemma
Scope also left out of training.

**Training.** :func:`train_saes` trains one SAE per layer; the embedded default's SAEs
(:func:`mechmed.demo.saes.ensure_demo_saes`) are one SAE per decoder layer of the
demo model on its resid_post activations over demo prompts (image + question prompts and the demo
corpus), with sae-lens's own classes (``BatchTopKTrainingSAE`` by default, ``TopKTrainingSAE`` /
``JumpReLUTrainingSAE`` on request) and trainer
(``SAETrainer``: its Adam optimiser, LR schedule, dead-latent tracking and auxiliary losses). All
layers are trained in lockstep on the same token batches, driving each layer's ``SAETrainer``
through its public ``step`` seam, as sae-lens's ``MultiSAETrainer`` does; ``fit()`` itself is not
called because it draws a progress bar on the terminal and only reads activations from a
``DataProvider`` iterator, while here the activations are already in memory. The result is saved
as one sae-lens directory per layer (``layer_{L}/``, ``SAE.load_from_disk`` reads it), cached beside
the demo model and keyed by its weights and the recipe (:class:`SAETrainConfig`), written to a
temporary directory and renamed into place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from mechmed.errors import MechmedError
from mechmed.runtime import hub_offline, torch_threads
from mechmed.sites import Site, parse_layers

log = logging.getLogger(__name__)

SAE_KINDS = ("topk", "batchtopk", "jumprelu")
MANIFEST = "mechmed_saes.json"
SAE_RECIPE_VERSION = "demo-saes-v1"
"""Bumped whenever the SAE training recipe changes meaning: it keys the demo's SAE cache."""

_LAYER_DIR_RE = re.compile(r"layer_(\d+)")
_MODULE_HOOK_RE = re.compile(r"(?:^|\.)layers\.(\d+)(?:\.(\w+))?$")
_MODULE_KINDS = {None: "resid_post", "": "resid_post", "mlp": "mlp_out", "post_feedforward_layernorm": "mlp_out",
                 "self_attn": "attn_out", "post_attention_layernorm": "attn_out"}


# ----------------------------------------------------------------------------- hook names


def hook_site(hook_name: str | None) -> Site | None:
    """The Site an SAE hook name refers to, or None if it names no decoder-layer site.

    ``blocks.17.hook_resid_post`` -> resid_post:17; ``model.layers.17``,
    ``model.language_model.layers.17`` (the output of decoder layer 17) -> resid_post:17;
    ``...layers.17.mlp`` -> mlp_out:17. Other names (``blocks.17.attn.hook_z``) give None.
    """
    if not hook_name:
        return None
    name = str(hook_name).strip()
    try:
        if name.startswith("blocks."):
            return Site.parse(name)
    except MechmedError:
        return None
    if re.search(r"vision|visual|encoder\.", name):  # the vision tower has layers too
        return None
    m = _MODULE_HOOK_RE.search(re.sub(r"\.output$", "", name))
    if m and m.group(2) in _MODULE_KINDS:
        return Site(int(m.group(1)), _MODULE_KINDS[m.group(2)])
    return None


def sae_hook_name(sae) -> str | None:
    """The hook name recorded in an SAE's metadata (``cfg.metadata.hook_name``), if any."""
    meta = getattr(sae.cfg, "metadata", None)
    name = getattr(meta, "hook_name", None) if meta is not None else None
    return name or getattr(sae.cfg, "hook_name", None)


# ----------------------------------------------------------------------------- loading


def _pretrained_directory() -> dict:
    from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

    return get_pretrained_saes_directory()


def _release_ids(release: str) -> list[str] | None:
    """The SAE ids of a known sae-lens release (None if the release is not in its directory)."""
    entry = _pretrained_directory().get(release)
    if entry is None:
        return None
    return list(entry.saes_map)


def _split_pretrained(spec: str) -> tuple[str, str] | None:
    """``RELEASE:ID`` (any release) or ``RELEASE/ID`` (a release sae-lens knows) -> (release, id)."""
    if ":" in spec and not Path(spec).expanduser().exists():
        release, _, sae_id = spec.partition(":")
        if release and sae_id and "/" not in release:
            return release, sae_id
    if "/" in spec and not spec.startswith((".", "/", "~")):
        release, _, sae_id = spec.partition("/")
        if _release_ids(release) is not None:
            return release, sae_id
    return None


def _load_pretrained(release: str, sae_id: str, device: str, dtype: str):
    from sae_lens import SAE

    ids = _release_ids(release)
    if ids is not None and sae_id not in ids:
        close = [i for i in ids if i.split("_width")[0] == sae_id.split("_width")[0]][:4] or ids[:4]
        raise MechmedError(
            f"--saes {release}:{sae_id}: release {release} has no SAE {sae_id!r}; "
            f"e.g. {', '.join(close)}"
        )
    try:
        return SAE.from_pretrained(release, sae_id, device=device, dtype=dtype)
    except MechmedError:
        raise
    except Exception as e:  # network, hub, missing cache: all reported the same way
        first = (str(e).splitlines() or [type(e).__name__])[0]
        if hub_offline():
            raise MechmedError(
                f"--saes {release}:{sae_id}: not in the local Hugging Face cache and HF_HUB_OFFLINE is set "
                f"({first}); unset HF_HUB_OFFLINE to download it, or pass a local SAE directory"
            ) from e
        raise MechmedError(f"--saes {release}:{sae_id}: cannot download it ({first})") from e


def _read_raw_params(path: Path) -> dict:
    from safetensors.torch import load_file

    try:
        raw = load_file(str(path))
    except Exception as e:
        raise MechmedError(f"SAE file {path}: not a readable safetensors file ({e})") from e
    by_lower = {k.lower(): v for k, v in raw.items()}
    missing = [k for k in ("w_enc", "w_dec", "b_enc", "b_dec", "threshold") if k not in by_lower]
    if missing:
        raise MechmedError(
            f"SAE file {path}: missing {', '.join(missing)}; a Gemma Scope params.safetensors holds "
            "w_enc, w_dec, b_enc, b_dec and threshold (JumpReLU)"
        )
    return by_lower


def _raw_hook_name(path: Path) -> tuple[str | None, str | None]:
    """(TransformerLens hook name, HF hook name) of a raw Gemma Scope SAE, from the ``config.json``
    beside it or from its directory name (``layer_17_...`` under ``resid_post``)."""
    hf_name = None
    cfg_path = path.parent / "config.json"
    if cfg_path.is_file():
        try:
            hf_name = json.loads(cfg_path.read_text()).get("hf_hook_point_in")
        except (json.JSONDecodeError, OSError, AttributeError):
            hf_name = None
    site = hook_site(hf_name)
    if site is None:
        text = str(path.parent)
        hits = list(_LAYER_DIR_RE.finditer(text))
        m = hits[-1] if hits else None
        if m is not None and not re.search(r"attn|mlp|transcoder|clt", text):
            site = Site(int(m.group(1)))
    return (site.hook_name if site else None), hf_name


def load_raw_gemma_scope(path: str | os.PathLike, *, device: str = "cpu", dtype: str = "float32"):
    """A sae-lens ``JumpReLUSAE`` from a Gemma Scope ``params.safetensors`` (no download)."""
    import torch
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

    path = Path(path)
    raw = _read_raw_params(path)
    d_in, d_sae = raw["w_enc"].shape
    if tuple(raw["w_dec"].shape) != (d_sae, d_in):
        raise MechmedError(
            f"SAE file {path}: w_dec has shape {tuple(raw['w_dec'].shape)}, expected ({d_sae}, {d_in}) "
            "for w_enc of shape ({d_in}, {d_sae})"
        )
    hook_name, hf_name = _raw_hook_name(path)
    meta = {"hook_name": hook_name, "hf_hook_name": hf_name, "source": str(path)}
    from sae_lens.saes.sae import SAEMetadata

    cfg = JumpReLUSAEConfig(d_in=int(d_in), d_sae=int(d_sae), dtype=dtype, device=device,
                            apply_b_dec_to_input=False, metadata=SAEMetadata(**meta))
    sae = JumpReLUSAE(cfg)
    tdtype = getattr(torch, dtype)
    state = {"W_enc": raw["w_enc"], "W_dec": raw["w_dec"], "b_enc": raw["b_enc"], "b_dec": raw["b_dec"],
             "threshold": raw["threshold"]}
    sae.load_state_dict({k: v.to(device=device, dtype=tdtype) for k, v in state.items()})
    return sae.eval()


def load_sae(spec, *, device: str = "cpu", dtype: str = "float32"):
    """Load one SAE: a (release, id) pair or ``RELEASE:ID``, a sae-lens directory, or a raw Gemma
    Scope ``params.safetensors`` (or a directory holding one). Returns a sae-lens ``SAE`` in eval mode."""
    if isinstance(spec, (tuple, list)):
        if len(spec) != 2:
            raise MechmedError(f"SAE spec {spec!r}: give a (release, sae_id) pair")
        return _load_pretrained(str(spec[0]), str(spec[1]), device, dtype).eval()
    text = str(spec)
    path = Path(text).expanduser()
    if path.is_dir():
        if (path / "cfg.json").is_file():
            from sae_lens import SAE

            try:
                return SAE.load_from_disk(str(path), device=device, dtype=dtype).eval()
            except Exception as e:
                raise MechmedError(f"SAE directory {path}: sae-lens cannot load it ({str(e).splitlines()[0]})") from e
        if (path / "params.safetensors").is_file():
            return load_raw_gemma_scope(path / "params.safetensors", device=device, dtype=dtype)
        raise MechmedError(
            f"SAE directory {path}: has neither cfg.json (a sae-lens SAE) nor params.safetensors "
            "(a Gemma Scope SAE)"
        )
    if path.is_file():
        if path.suffix == ".safetensors":
            return load_raw_gemma_scope(path, device=device, dtype=dtype)
        raise MechmedError(f"SAE file {path}: expected a params.safetensors or a sae-lens directory")
    pair = _split_pretrained(text)
    if pair is not None:
        return _load_pretrained(*pair, device, dtype).eval()
    raise MechmedError(
        f"SAE {text!r}: no such file or directory; give a sae-lens directory, a params.safetensors, "
        "or a pretrained RELEASE:SAE_ID (e.g. gemma-scope-2-4b-it-res:layer_17_width_16k_l0_big)"
    )


def check_sae(sae, bundle, site: Site) -> None:
    """Raise unless ``sae`` reads ``site`` of ``bundle``'s model: same width, same layer and kind."""
    site.check(bundle.n_layers)
    d_in, width = int(sae.cfg.d_in), int(bundle.d_model)
    hook = sae_hook_name(sae)
    where = f"the SAE for layer {site.layer}" + (f" ({hook})" if hook else "")
    if d_in != width:
        raise MechmedError(
            f"{where}: its width d_in={d_in} differs from the model's width {width}; use SAEs trained on "
            f"this model (d_in={width}), e.g. --saes demo for the demo model or gemma-scope-2-4b-it-res "
            "for MedGemma-4B / Gemma 3 4B"
        )
    sae_site = hook_site(hook)
    if sae_site is None:
        log.warning("%s records no decoder-layer hook name (%r); assuming it reads %s", where, hook, site)
        return
    if sae_site != site:
        raise MechmedError(
            f"{where}: it reads {sae_site.hook_name} (layer {sae_site.layer}, {sae_site.kind}) but is "
            f"used for {site.hook_name} (layer {site.layer}, {site.kind}); pass the SAE trained on "
            f"layer {site.layer} (e.g. layer_{site.layer}_... or a {{L}} template)"
        )


# ----------------------------------------------------------------------------- --saes specs


def _layer_dirs(root: Path) -> dict[int, Path]:
    """Per-layer SAE locations under ``root``: ``layer_{L}`` subdirectories, or any SAE subdirectory
    whose recorded hook names a layer."""
    out: dict[int, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        is_sae = (sub / "cfg.json").is_file() or (sub / "params.safetensors").is_file()
        if not is_sae:
            continue
        m = _LAYER_DIR_RE.search(sub.name)
        layer = int(m.group(1)) if m else None
        if layer is None and (sub / "cfg.json").is_file():
            try:
                meta = json.loads((sub / "cfg.json").read_text()).get("metadata") or {}
            except (json.JSONDecodeError, OSError):
                meta = {}
            site = hook_site(meta.get("hook_name"))
            layer = site.layer if site else None
        if layer is None:
            continue
        if layer in out:
            raise MechmedError(f"--saes {root}: two SAEs for layer {layer} ({out[layer].name}, {sub.name}); keep one")
        out[layer] = sub
    return out


def _template_layers(spec: str, n_layers: int) -> dict[int, Any]:
    """Layers a ``{L}`` template covers: local paths that exist, or ids a known release lists."""
    existing = {L: spec.format(L=L) for L in range(n_layers) if Path(spec.format(L=L)).expanduser().exists()}
    if existing:
        return existing
    release, sep, template = spec.partition(":")
    if not sep or not release or "/" in release or "{L}" in release:
        raise MechmedError(
            f"--saes {spec}: no path matches it for any layer, and it is not RELEASE:ID_TEMPLATE; "
            "write e.g. gemma-scope-2-4b-it-res:layer_{L}_width_16k_l0_big"
        )
    ids = _release_ids(release)
    wanted = {L: (release, template.format(L=L)) for L in range(n_layers)}
    if ids is None:  # not a release sae-lens lists: a hub repo, try every layer asked for
        return wanted
    return {L: p for L, p in wanted.items() if p[1] in set(ids)}


def sae_sources(spec: str, n_layers: int, *, cache_dir: str | None = None, seed: int = 0) -> dict[int, Any]:
    """The ``--saes`` spec as {layer: source for :func:`load_sae`} for every layer it covers."""
    spec = str(spec).strip()
    if not spec:
        raise MechmedError("--saes is empty; give demo, a directory, or RELEASE:ID_TEMPLATE")
    from mechmed.sources import saes_dir

    root = saes_dir(spec, cache_dir=cache_dir, seed=seed)
    if root is not None:
        return {L: str(p) for L, p in _layer_dirs(root).items()}
    if "{L}" in spec:
        return _template_layers(spec, n_layers)
    path = Path(spec).expanduser()
    if path.is_dir():
        if (path / "cfg.json").is_file() or (path / "params.safetensors").is_file():
            sae = load_sae(path)
            site = hook_site(sae_hook_name(sae))
            if site is None:
                raise MechmedError(
                    f"--saes {spec}: one SAE whose hook name does not say its layer; put it in a "
                    "layer_{L} subdirectory"
                )
            return {site.layer: str(path)}
        found = _layer_dirs(path)
        if not found:
            raise MechmedError(
                f"--saes {spec}: no SAE subdirectories (layer_{{L}}/ with cfg.json or params.safetensors) there"
            )
        return {L: str(p) for L, p in found.items()}
    if _split_pretrained(spec) is not None:
        release, sae_id = _split_pretrained(spec)
        sae = load_sae((release, sae_id))
        site = hook_site(sae_hook_name(sae))
        layer = site.layer if site else None
        if layer is None:
            raise MechmedError(f"--saes {spec}: its hook name does not say its layer; use a {{L}} template")
        return {layer: (release, sae_id)}
    raise MechmedError(
        f"--saes {spec}: not demo, not a directory, and not RELEASE:ID_TEMPLATE "
        "(e.g. gemma-scope-2-4b-it-res:layer_{L}_width_16k_l0_big)"
    )


#: The file a Neuronpedia explanation export is read from, beside a sae-lens SAE directory.
LABELS_FILE = "explanations.json"


def neuronpedia_id(source, sae=None) -> str | None:
    """The Neuronpedia id (``MODEL/SAE_ID``) of an SAE: from its sae-lens metadata, else from
    sae-lens's directory of pretrained releases for a (release, id) source. Read locally only."""
    nid = getattr(getattr(getattr(sae, "cfg", None), "metadata", None), "neuronpedia_id", None)
    if nid:
        return str(nid)
    if isinstance(source, (tuple, list)) and len(source) == 2:
        with contextlib.suppress(Exception):  # an unknown release has no id, which is not an error here
            from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory

            entry = get_pretrained_saes_directory().get(str(source[0]))
            return ((entry.neuronpedia_id or {}) if entry else {}).get(str(source[1])) or None
    return None


def feature_labels(source, sae=None) -> dict[int, str]:
    """Human labels of an SAE's features, where a local file has them; never invented.

    Read from ``explanations.json`` in the SAE's directory, else from
    ``$MECHMED_CACHE/neuronpedia/<neuronpedia id>.json``: Neuronpedia's explanation export (a list of
    objects with ``index`` and ``description``, as its ``/api/explanation/export`` writes) or a
    mapping of feature index to label. The first label of a feature is kept. Empty when neither
    exists, and (with a warning) when the file holds no labels.
    """
    from mechmed.runtime import cache_root

    candidates = []
    if not isinstance(source, (tuple, list)) and Path(str(source)).expanduser().is_dir():
        candidates.append(Path(str(source)).expanduser() / LABELS_FILE)
    nid = neuronpedia_id(source, sae)
    if nid:
        candidates.append(cache_root() / "neuronpedia" / f"{nid}.json")
    path = next((c for c in candidates if c.is_file()), None)
    if path is None:
        return {}
    from mechmed.io import read_json

    try:
        raw = read_json(path, "feature labels")
    except MechmedError as e:  # labels are optional: a bad file is said, not fatal
        log.warning("%s; the features stay unlabelled", e)
        return {}
    items = raw.items() if isinstance(raw, dict) else ((r.get("index"), r.get("description"))
                                                        for r in raw if isinstance(r, dict)) \
        if isinstance(raw, list) else ()
    labels: dict[int, str] = {}
    for index, text in items:
        with contextlib.suppress(TypeError, ValueError):
            if isinstance(text, str) and text.strip():
                labels.setdefault(int(index), " ".join(text.split()))
    if not labels:
        log.warning("feature labels %s: no labels read (write a Neuronpedia explanation export, objects with index "
                    "and description, or a mapping of feature index to label); the features stay unlabelled", path)
    return labels


def resolve_saes(spec: str, bundle, layers: str | Sequence[int] = "all", *, device: str | None = None,
                 cache_dir: str | None = None, seed: int = 0) -> dict[int, Any]:
    """Load and check one SAE per requested layer: {layer: SAE}.

    ``layers="all"`` means every model layer the spec has an SAE for; listed layers (``"15-19"``)
    must each exist in the model and have an SAE.
    """
    n = bundle.n_layers
    device = str(device or bundle.device)
    every = isinstance(layers, str) and layers.strip() == "all"
    if not every:  # checked before any SAE is fetched or trained
        wanted = parse_layers(layers, n) if isinstance(layers, str) else sorted({int(x) for x in layers})
        for L in wanted:
            Site(L).check(n)
    sources = sae_sources(spec, n, cache_dir=cache_dir, seed=seed)
    if every:
        wanted = sorted(L for L in sources if 0 <= L < n)
        if not wanted:
            raise MechmedError(f"--saes {spec}: covers layers {sorted(sources)}, none of the model's 0..{n - 1}")
    else:
        missing = [L for L in wanted if L not in sources]
        if missing:
            have = ",".join(map(str, sorted(sources))) or "none"
            raise MechmedError(f"--saes {spec}: no SAE for layer {missing[0]} (it has layers {have}); "
                               "choose --layers among those")
    saes = {}
    for L in wanted:
        sae = load_sae(sources[L], device=device)
        check_sae(sae, bundle, Site(L))
        sae.mechmed_labels = feature_labels(sources[L], sae)  # {} where no local file has them
        saes[L] = sae
    return saes


# ----------------------------------------------------------------------------- prompts and positions


def text_inputs(processor, texts: Sequence[str]):
    """Tokenise plain ``texts`` into a left-padded batch that starts with BOS (when the tokenizer
    has one), the way the model saw text in training."""
    texts = list(texts)
    if not texts:
        raise MechmedError("no texts to run: the text set is empty")
    tok = getattr(processor, "tokenizer", processor)
    tok.padding_side = "left"
    bos = getattr(tok, "bos_token", None) or ""
    return tok([bos + t for t in texts], return_tensors="pt", padding=True, add_special_tokens=False)


def token_mask(inputs, tokenizer):
    """[batch, pos] bool: the positions SAEs read (real tokens, BOS excluded)."""
    mask = inputs["attention_mask"].bool()
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is not None:
        mask = mask & (inputs["input_ids"] != bos)
    return mask


# ----------------------------------------------------------------------------- training


@dataclass(frozen=True)
class SAETrainConfig:
    """Every number of the demo SAEs' recipe (its hash keys the cache)."""

    kind: str = "batchtopk"
    """SAE architecture: ``batchtopk`` (sae-lens BatchTopKTrainingSAE: the top k·batch latents of a
    batch, so a hard token may use more than k; saved as a JumpReLU SAE, Gemma Scope's
    architecture), ``topk`` (TopKTrainingSAE: exactly k per token) or ``jumprelu``
    (JumpReLUTrainingSAE with Gemma Scope 2's quadratic L0 penalty around ``k``)."""
    d_sae: int = 512
    """Latents per SAE."""
    k: int = 24
    """Active latents per token: TopK's k, BatchTopK's mean, JumpReLU's target L0."""
    steps: int = 1100
    """Optimiser steps per layer (all layers step together on the same token batch)."""
    batch_size: int = 384
    """Tokens per step."""
    lr: float = 1.2e-2
    """Peak Adam learning rate."""
    warmup_frac: float = 0.02
    """Fraction of steps warming the learning rate up."""
    decay_frac: float = 0.3
    """Fraction of steps decaying it linearly to zero at the end."""
    dead_feature_window: int = 200
    """Steps without firing after which a latent counts as dead (TopK's auxiliary loss revives it)."""
    n_image_prompts: int = 800
    """Image + question prompts over the demo's training images."""
    n_corpus_reports: int = 300
    """Reports of the demo corpus (its definitions are always included)."""
    oov_rates: tuple = (0.2, 0.4, 0.6)
    """For each rate, a copy of the corpus with that fraction of words replaced by the unknown token:
    text outside the demo's vocabulary (general English) reaches the model as mostly ``<unk>``, and
    the SAEs must have seen such sequences to reconstruct them."""
    holdout_frac: float = 0.1
    """Tokens kept out of training to measure R² and L0 at the end."""
    jumprelu_l0_coefficient: float = 1.0
    """Weight of JumpReLU's quadratic L0 penalty."""

    def __post_init__(self):
        if self.kind not in SAE_KINDS:
            raise MechmedError(f"SAE kind {self.kind!r}: choose one of {', '.join(SAE_KINDS)}")
        if not 0 < self.k <= self.d_sae:
            raise MechmedError(f"SAE training: k={self.k} must be in 1..d_sae={self.d_sae}")
        if self.steps < 1 or self.batch_size < 1:
            raise MechmedError(f"SAE training: steps={self.steps}, batch_size={self.batch_size}; both must be positive")
        if not 0 <= self.holdout_frac < 1:
            raise MechmedError(f"SAE training: holdout_frac={self.holdout_frac} must be in [0, 1)")

    def to_dict(self) -> dict:
        return {"version": SAE_RECIPE_VERSION, **asdict(self)}

    @classmethod
    def from_dict(cls, d: dict) -> SAETrainConfig:
        """The recipe :meth:`to_dict` wrote; options of another recipe version are warned and dropped."""
        from mechmed.config import known_keys

        d = dict(d)
        version = d.pop("version", SAE_RECIPE_VERSION)
        return cls(**known_keys(d, [f.name for f in fields(cls)], "SAE recipe", newer=version != SAE_RECIPE_VERSION,
                                version=f"SAE recipe {version!r} (this mechmed: {SAE_RECIPE_VERSION!r})"))

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:12]


@dataclass
class TrainedSAEs:
    """SAEs trained by :func:`train_saes` (sae-lens inference SAEs, by layer) and their statistics."""

    saes: dict
    stats: dict


def collect_activations(bundle, batches: Iterable, layers: Sequence[int]) -> dict[int, Any]:
    """resid_post activations at :func:`token_mask` positions, all layers in one forward per batch:
    {layer: float32 [tokens, d_model] on the CPU}."""
    import torch

    from mechmed.capture import capture

    sites = [Site(L) for L in layers]
    parts: dict[int, list] = {L: [] for L in layers}
    for inputs in batches:
        inputs = inputs.to(bundle.device)
        acts, _ = capture(bundle, inputs, sites)
        mask = token_mask(inputs, bundle.tokenizer)
        for s in sites:
            x = acts[s][mask].float().cpu()
            if not torch.isfinite(x).all():
                raise MechmedError(f"layer {s.layer}: activations contain NaN/inf; check the model weights and --dtype")
            parts[s.layer].append(x)
    return {L: torch.cat(v) for L, v in parts.items()}


def _training_sae(cfg: SAETrainConfig, d_in: int, hook_name: str, model_name: str):
    from sae_lens import (
        BatchTopKTrainingSAE,
        BatchTopKTrainingSAEConfig,
        JumpReLUTrainingSAE,
        JumpReLUTrainingSAEConfig,
        TopKTrainingSAE,
        TopKTrainingSAEConfig,
    )
    from sae_lens.saes.sae import SAEMetadata

    meta = SAEMetadata(hook_name=hook_name, model_name=model_name, prepend_bos=True, exclude_bos=True)
    common = dict(d_in=d_in, d_sae=cfg.d_sae, normalize_activations="expected_average_only_in", metadata=meta)
    if cfg.kind == "topk":
        return TopKTrainingSAE(TopKTrainingSAEConfig(k=cfg.k, **common))
    if cfg.kind == "batchtopk":
        return BatchTopKTrainingSAE(BatchTopKTrainingSAEConfig(k=cfg.k, **common))
    return JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
        jumprelu_sparsity_loss_mode="quadratic", target_l0=float(cfg.k), l0_coefficient=cfg.jumprelu_l0_coefficient,
        **common))


def _pooled_r2(x, x_hat) -> float:
    """1 − Σ‖x − x̂‖² / Σ‖x − μ‖², μ the mean over all rows (float64)."""
    x, x_hat = x.double(), x_hat.double()
    ss_res = float((x - x_hat).pow(2).sum())
    ss_tot = float((x - x.mean(0)).pow(2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else float("nan")


def train_saes(acts: dict[int, Any], cfg: SAETrainConfig | None = None, *, seed: int = 0,
               model_name: str = "", progress: str | None = None, num_threads: int | None = None,
               workers: int = 1) -> TrainedSAEs:
    """Train one SAE per layer on in-memory activations ({layer: [tokens, d_in]}, same tokens in
    every layer) with sae-lens's ``SAETrainer``; returns inference SAEs and held-out R²/L0 per layer.

    ``num_threads`` (default: 1 for small SAEs, d_in·d_sae ≤ 2¹⁸, else torch's setting) applies
    during training only: small matmuls gain nothing from OpenMP threads, and lose several-fold
    when the cores are shared with other processes. ``workers`` > 1 trains the layers in that many
    processes (each with ``num_threads``): every layer sees the same batches and starts from the same
    weights as in one process, so the SAEs are the same bit for bit.
    """
    cfg = cfg or SAETrainConfig()
    if num_threads is None and acts:
        d_in = int(next(iter(acts.values())).shape[1])
        num_threads = 1 if d_in * cfg.d_sae <= 1 << 18 else None
    with torch_threads(num_threads):
        return _train_saes(acts, cfg, seed=seed, model_name=model_name, progress=progress,
                           workers=max(1, int(workers)), num_threads=num_threads)


def _split(n: int, holdout_frac: float, seed: int):
    """The generator that draws training batches, and the (held-out, training) token indices."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(n, generator=gen)
    n_hold = int(n * holdout_frac)
    return gen, order[:n_hold], order[n_hold:]


def _fit_layers(acts: dict[int, Any], index: dict[int, int], cfg: SAETrainConfig, seed: int, model_name: str,
                out: str, progress: str | None = None, num_threads: int | None = None) -> dict:
    """Train the SAEs of ``acts``' layers (``index``: each layer's position among all the layers
    trained, which seeds its initial weights) and save each inference SAE as ``out/layer_{L}``;
    returns {layer: dead latents}. Every call draws the same batches (the seed's generator), so the
    layers can be split between processes."""
    import torch
    from sae_lens import SAETrainer
    from sae_lens.config import SAETrainerConfig

    from mechmed.progress import progress_bar
    from mechmed.runtime import deterministic

    n = int(next(iter(acts.values())).shape[0])
    gen, _, train = _split(n, cfg.holdout_frac, seed)
    warm = max(1, int(cfg.steps * cfg.warmup_frac))
    decay = int(cfg.steps * cfg.decay_frac)
    tcfg = SAETrainerConfig(total_training_samples=cfg.steps * cfg.batch_size, train_batch_size_samples=cfg.batch_size,
                            lr=cfg.lr, lr_warm_up_steps=warm, lr_decay_steps=decay, lr_end=0.0,
                            dead_feature_window=cfg.dead_feature_window,
                            feature_sampling_window=max(cfg.steps, 1), device="cpu")
    trainers = {}
    with torch_threads(num_threads), deterministic(), torch.random.fork_rng():
        for L in sorted(acts):
            x = acts[L]
            d_in = int(x.shape[1])
            torch.manual_seed(seed * 1000 + index[L])
            sae = _training_sae(cfg, d_in, Site(L).hook_name, model_name)
            tr = SAETrainer(cfg=tcfg, sae=sae, data_provider=iter(()))
            # sae-lens's "expected_average_only_in": scale so that E‖x‖ = √d_in, folded in at the end
            sample = x[train[: 64 * cfg.batch_size]]
            tr.activation_scaler.scaling_factor = float(d_in**0.5 / sample.norm(dim=-1).mean())
            with torch.no_grad():  # start the decoder bias at the mean activation (in scaled units)
                sae.b_dec.copy_(sample.mean(0) * tr.activation_scaler.scaling_factor)
            trainers[L] = tr
        for _ in progress_bar(range(cfg.steps), desc=progress, total=cfg.steps):
            idx = train[torch.randint(train.numel(), (cfg.batch_size,), generator=gen)]
            for L, tr in trainers.items():
                tr.maybe_reset_sparsity()
                tr.step(acts[L][idx])
                tr.n_training_steps += 1
    dead = {}
    for L, tr in trainers.items():
        sae = tr.sae
        sae.fold_activation_norm_scaling_factor(tr.activation_scaler.scaling_factor)
        tr.activation_scaler.scaling_factor = None
        tr.set_final_sae_metadata()
        sae.eval()
        # the inference SAE exactly as it will be saved and reloaded (TopK's decoder norm folded in)
        sae.save_inference_model(Path(out) / f"layer_{L}")
        dead[L] = int(tr.dead_neurons.sum())
    return dead


def _train_saes(acts: dict[int, Any], cfg: SAETrainConfig, *, seed: int, model_name: str,
                progress: str | None, workers: int = 1, num_threads: int | None = None) -> TrainedSAEs:
    import torch
    from sae_lens import SAE

    layers = sorted(acts)
    if not layers:
        raise MechmedError("SAE training: no layers given")
    n = int(acts[layers[0]].shape[0])
    if any(int(acts[L].shape[0]) != n for L in layers):
        raise MechmedError("SAE training: every layer needs the same tokens (equal row counts)")
    c0 = _cpu_seconds()
    _, hold, train = _split(n, cfg.holdout_frac, seed)
    n_hold = int(hold.numel())
    if train.numel() < cfg.batch_size // 4:
        raise MechmedError(f"SAE training: only {train.numel()} training tokens; give more prompts")
    index = {L: i for i, L in enumerate(layers)}
    groups = [layers[g::workers] for g in range(min(workers, len(layers)))]
    saes, per_layer = {}, {}
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        dead = _fit_groups(acts, groups, index, cfg, seed, model_name, tmp, progress, num_threads)
        train_s, train_cpu_s = time.perf_counter() - t0, _cpu_seconds() - c0
        for L in layers:
            inf = SAE.load_from_disk(str(Path(tmp) / f"layer_{L}")).eval()
            x = acts[L][hold] if n_hold else acts[L][train[:4096]]
            with torch.no_grad():
                f = inf.encode(x)
                r2 = _pooled_r2(x, inf.decode(f))
                l0 = float((f != 0).float().sum(-1).mean())
            saes[L] = inf
            per_layer[L] = {"r2_heldout": r2, "l0_heldout": l0, "dead_latents": dead[L]}
            log.info("SAE layer %d: held-out R² %.4f, L0 %.1f", L, r2, l0)
    stats = {"train_s": train_s, "train_cpu_s": train_cpu_s, "n_tokens": n, "n_train_tokens": int(train.numel()),
             "n_heldout_tokens": n_hold, "layers": per_layer, "workers": len(groups)}
    return TrainedSAEs(saes, stats)


def _cpu_seconds() -> float:
    """CPU seconds of this process and of its finished children (the worker processes that trained layers)."""
    try:
        import resource
    except ImportError:  # not a Unix: this process alone
        return time.process_time()
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + kids.ru_utime + kids.ru_stime


def _fit_groups(acts, groups, index, cfg, seed, model_name, out, progress, num_threads) -> dict:
    """:func:`_fit_layers` for each group of layers: the first here, the others in spawned processes
    at the same time; {layer: dead latents}."""
    if len(groups) == 1:
        return _fit_layers(acts, index, cfg, seed, model_name, out, progress, num_threads)
    import concurrent.futures as cf
    import multiprocessing as mp

    with cf.ProcessPoolExecutor(len(groups) - 1, mp_context=mp.get_context("spawn")) as pool:
        futures = [pool.submit(_fit_layers, {L: acts[L] for L in g}, index, cfg, seed, model_name, out, None,
                               num_threads) for g in groups[1:]]
        dead = _fit_layers({L: acts[L] for L in groups[0]}, index, cfg, seed, model_name, out, progress, num_threads)
        for fut in futures:
            dead.update(fut.result())
    return dead


def save_sae_set(saes: dict, path: str | os.PathLike, manifest: dict | None = None) -> Path:
    """Write {layer: SAE} as ``layer_{L}/`` sae-lens directories (+ a manifest) under ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    from mechmed.io import follow_umask, write_json

    for L, sae in saes.items():
        sae.save_model(str(path / f"layer_{L}"))
    if manifest is not None:
        write_json(path / MANIFEST, manifest)
    follow_umask(path)  # safetensors writes owner-only files
    return path
