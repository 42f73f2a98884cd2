"""Spectral mixture of LoRA experts (``method: spectral_moe``) on exactly the selected decoder layers.

Each adapted linear layer ``y = W0 x + b`` (W0: [m, n]) gets N experts of rank r/N (r = ``rank``,
the total rank) and a linear router on the layer's input; each routed expert contributes its change
since initialisation:

    y = W0 x + b + s Σ_{i ∈ topk(x)} g_i(x) (B_i A_i − B⁰_i A⁰_i) x

- **Router**: p = softmax(R x) over the N experts; the k largest are kept and renormalised,
  g_i = p_i / Σ_{j ∈ topk} p_j (exactly k non-zero weights summing to 1).
- **Spectral initialisation** (``init: spectral``, GOAT's): with W0 = U S Vᵀ and d = min(m, n),
  expert i takes the singular directions [i·⌊d/N⌋, i·⌊d/N⌋ + r/N) (non-overlapping segments spread
  over the spectrum): B_i = U_i S_i^½ / √(s·ρ), A_i = S_i^½ V_iᵀ / √(s·ρ), so
  s·B_i A_i = U_i S_i V_iᵀ / ρ. ``principal`` splits the top r directions among the experts,
  ``minor`` the bottom r; ``random`` draws A and B Kaiming-uniform; ``zero_b`` draws A and sets
  B = 0 (plain LoRA's start).
- **Compensation, routed**: B⁰_i, A⁰_i are expert i's factors at initialisation (saved, frozen).
  Each routed expert subtracts its own initial product at its own gate, so at initialisation the
  layer is W0 exactly, whatever the router, the initialisation or ρ (GOAT instead subtracts
  s·Σ_i B⁰_i A⁰_i from W0 once, which cancels the experts only when every gate is 1). The gradients
  of the experts are GOAT's; the router's is taken through the change (B_i A_i − B⁰_i A⁰_i) x, so
  routing starts to matter as the experts move. W0 itself is never changed: disabling the adapter
  gives the base model back bit for bit, and loading needs only the saved factors.
- **Scaling**: s = √(3·n·η / (r/N)) (``scaling: rule``; n the layer's input width, η = ``lr_ratio``,
  r/N the rank of one expert, as GOAT), or a fixed number.
- **Load balancing**: per adapted layer N·Σ_i f_i·P_i, f_i the fraction of top-k assignments that
  went to expert i (Σ f = 1), P_i the mean router probability; :func:`balance_loss` averages it
  over the adapted layers (1.0 when perfectly balanced) and training adds ``balance_coef`` times it.

Saved as a directory: ``spectral_config.json`` (``adapter_type: mechmed_spectral_moe``, the options
and each module's scale and segments), ``adapter_model.safetensors`` (experts, routers and initial
factors, float32) and a README naming the loader. It is not a peft adapter (peft finds no
``adapter_config.json`` there); :func:`mechmed.models.attach_adapter` loads it. Adapters written
before the routed compensation (format 1, ``adapter_config.json``) load with the compensation they
were trained with: −(s/N) Σ_i B⁰_i A⁰_i x for every token.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from mechmed.config import SPECTRAL_INITS as INITS
from mechmed.config import parse_scaling
from mechmed.errors import MechmedError

log = logging.getLogger(__name__)

ADAPTER_TYPE = "mechmed_spectral_moe"
FORMAT_VERSION = 2
ROUTINGS = ("topk", "uniform")
#: ``routed``: each routed expert subtracts its initial product at its gate (format 2); ``mean``:
#: −(s/N)·Σ B⁰A⁰ for every token (format-1 adapters, kept as they were trained when saved again).
COMPENSATIONS = ("routed", "mean")
CONFIG_FILE = "spectral_config.json"
#: Format 1 (compensation −(s/N)·Σ B⁰A⁰ for every token) was written under peft's file name.
LEGACY_CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
README = """# mechmed spectral mixture-of-LoRA-experts adapter

Not a peft adapter. Load it onto the base model it was trained on with
`mechmed.models.attach_adapter(bundle, this_directory)`, or `mechmed evaluate --adapter this_directory`.
Files: `spectral_config.json` (options, scales, SVD segments), `adapter_model.safetensors`.
"""
_SAVED = ("lora_A", "lora_B", "router.weight", "init_A", "init_B")


# ---------------------------------------------------------------- options

def check_options(n_experts: int, top_k: int, rank: int, init: str, scaling, damping: float = 10.0,
                  lr_ratio: float = 1.0) -> float | None:
    """Validate the spectral options; returns the fixed scale (None for the rule)."""
    if not isinstance(n_experts, int) or n_experts < 1:
        raise MechmedError(f"config option spectral.n_experts: {n_experts!r} is invalid; use a positive integer")
    if not isinstance(top_k, int) or not 1 <= top_k <= n_experts:
        raise MechmedError(f"config option spectral.top_k: {top_k!r} is invalid; use between 1 and "
                           f"n_experts={n_experts}")
    if rank % n_experts:
        raise MechmedError(f"config option rank: {rank!r} is invalid; use a multiple of spectral.n_experts="
                           f"{n_experts} (each expert gets rank/n_experts)")
    if init not in INITS:
        raise MechmedError(f"config option spectral.init: {init!r} is invalid; use one of {', '.join(INITS)}")
    if not damping > 0:
        raise MechmedError(f"config option spectral.damping: {damping!r} is invalid; use a positive number")
    if not lr_ratio > 0:
        raise MechmedError(f"config option spectral.lr_ratio: {lr_ratio!r} is invalid; use a positive number")
    return parse_scaling(scaling)


def rule_scale(in_features: int, expert_rank: int, lr_ratio: float) -> float:
    """s = √(3·n·η / r_e), r_e = rank / n_experts the rank of one expert (GOAT's rule)."""
    return math.sqrt(3.0 * in_features * lr_ratio / expert_rank)


def segments(init: str, d: int, rank: int, n_experts: int) -> list[tuple[int, int]]:
    """[start, stop) of each expert's singular directions (spectral, principal, minor), d = min(m, n)."""
    r_e = rank // n_experts
    if init == "spectral":
        if r_e > d // n_experts:
            raise MechmedError(
                f"config option rank: {rank} is too large for spectral init on a layer with min(in, out) = {d}: "
                f"each of the {n_experts} experts needs rank/n_experts <= {d // n_experts}; lower rank or "
                "spectral.n_experts, or use init principal")
        return [(i * (d // n_experts), i * (d // n_experts) + r_e) for i in range(n_experts)]
    if rank > d:
        raise MechmedError(f"config option rank: {rank} exceeds min(in, out) = {d} of an adapted layer; lower it")
    first = 0 if init == "principal" else d - rank
    return [(first + i * r_e, first + (i + 1) * r_e) for i in range(n_experts)]


# ---------------------------------------------------------------- the layer

class SpectralMoELinear(nn.Module):
    """A frozen ``nn.Linear`` plus N routed low-rank experts, each compensated by its initial product.

    Parameters (float32): ``lora_A`` [r, n] and ``lora_B`` [m, r] (expert i owns rows / columns
    i·r/N … (i+1)·r/N), ``router.weight`` [N, n]. Buffers: ``init_A``, ``init_B`` (the experts at
    initialisation, for the compensation). ``compensation``: ``routed`` (each routed expert
    subtracts its initial product at its gate) or ``mean`` (format-1 adapters: −(s/N)·Σ B⁰A⁰).
    """

    def __init__(self, base_layer: nn.Linear, *, n_experts: int, top_k: int, rank: int, scale: float,
                 init: str = "spectral", damping: float = 10.0, generator: torch.Generator | None = None):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise MechmedError(f"spectral_moe adapts nn.Linear layers only, not {type(base_layer).__name__}; "
                               "check config option target_modules")
        self.base_layer = base_layer
        self.n_experts, self.top_k, self.rank = n_experts, top_k, rank
        self.expert_rank = rank // n_experts
        self.scale = float(scale)
        self.init = init
        self.damping = float(damping)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        device = base_layer.weight.device
        m, n = self.out_features, self.in_features
        self.lora_A = nn.Parameter(torch.zeros(rank, n, device=device))
        self.lora_B = nn.Parameter(torch.zeros(m, rank, device=device))
        self.router = nn.Linear(n, n_experts, bias=False, device=device, dtype=torch.float32)
        self.register_buffer("init_A", torch.zeros(rank, n, device=device), persistent=False)
        self.register_buffer("init_B", torch.zeros(m, rank, device=device), persistent=False)
        self.segments: list[tuple[int, int]] | None = None
        self.routing = "topk"
        self.compensation = "routed"
        self.disabled = False
        self._balance = None
        self._counts = None
        self._token_mask = None
        if init != "load":
            self._initialise(generator)

    # -- initialisation
    def _initialise(self, generator: torch.Generator | None) -> None:
        m, n, r, N = self.out_features, self.in_features, self.rank, self.n_experts
        device = self.lora_A.device

        def uniform(shape, fan_in):
            bound = 1.0 / math.sqrt(fan_in)  # kaiming_uniform(a=√5), nn.Linear's default
            return (torch.rand(shape, generator=generator, dtype=torch.float32) * 2 - 1).mul_(bound).to(device)

        with torch.no_grad():
            self.router.weight.copy_(uniform((N, n), n))
            if self.init in ("spectral", "principal", "minor"):
                W = self.base_layer.weight.detach().to(torch.float64)
                U, S, Vh = torch.linalg.svd(W, full_matrices=False)
                self.segments = segments(self.init, min(m, n), r, N)
                idx = torch.cat([torch.arange(a, b) for a, b in self.segments]).to(S.device)
                root = S[idx].sqrt() / math.sqrt(self.scale * self.damping)
                self.lora_B.copy_((U[:, idx] * root).to(torch.float32))
                self.lora_A.copy_((root[:, None] * Vh[idx]).to(torch.float32))
            else:
                self.lora_A.copy_(uniform((r, n), n))
                self.lora_B.copy_(torch.zeros(m, r) if self.init == "zero_b" else uniform((m, r), self.expert_rank))
            self.init_A.copy_(self.lora_A)
            self.init_B.copy_(self.lora_B)

    def expert(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(B_i [m, r/N], A_i [r/N, n]) of expert i."""
        sl = slice(i * self.expert_rank, (i + 1) * self.expert_rank)
        return self.lora_B[:, sl], self.lora_A[sl]

    # -- routing
    def gates(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(gates [..., N] with exactly k non-zero entries summing to 1, probs [..., N], top-k indices)."""
        probs = _softmax_last(self.router(h).float())
        if self.routing == "uniform":
            full = torch.full_like(probs, 1.0 / self.n_experts)
            return full, probs, torch.arange(self.n_experts, device=h.device).expand(*probs.shape[:-1], -1)
        top_p, top_i = probs.topk(self.top_k, dim=-1)
        g = top_p / top_p.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, top_i, g), probs, top_i

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return out
        h = x.to(self.lora_A.dtype)
        gates, probs, top_i = self.gates(h)
        N, r_e = self.n_experts, self.expert_rank
        # All experts as one rank-r product, unselected experts masked by their zero gate: the same
        # two matmuls as LoRA at the same total rank (a per-token gather of expert weights costs more).
        # The compensation shares them: z = [A; A⁰] x, each of its 2N blocks of r/N rows scaled by its
        # coefficient (s·g_i for an expert, −s·g_i for its initial copy), then [B, B⁰] z.
        z = F.linear(h, torch.cat([self.lora_A, self.init_A]))
        comp = -gates * self.scale if self.compensation == "routed" else \
            gates.new_full((1,), -self.scale / self.n_experts).expand_as(gates)
        coef = torch.cat([gates * self.scale, comp], dim=-1)
        z = (z.unflatten(-1, (2 * N, r_e)) * coef.unsqueeze(-1)).flatten(-2)
        delta = F.linear(z, torch.cat([self.lora_B, self.init_B], dim=1))
        if self.training and torch.is_grad_enabled() and self.routing == "topk":
            flat = probs.reshape(-1, N)
            chosen = torch.zeros_like(flat).scatter_(-1, top_i.reshape(-1, self.top_k), 1.0)
            f = chosen.mean(0) / self.top_k
            self._balance = N * (f.detach() * flat.mean(0)).sum()
        if self._counts is not None:
            chosen = torch.zeros_like(probs).scatter_(-1, top_i, 1.0).detach()
            mask = self._token_mask
            if mask is not None and mask.shape == chosen.shape[:-1]:
                chosen = chosen[mask.to(chosen.device)]
            self._counts += chosen.reshape(-1, N).sum(0).double().cpu()
        return out + delta.to(out.dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={self.n_experts}, top_k={self.top_k}, "
                f"rank={self.rank}, scale={self.scale:.4g}, init={self.init}")


# ---------------------------------------------------------------- the model

class SpectralMoEModel(nn.Module):
    """A model whose selected linear layers are :class:`SpectralMoELinear`; attribute access falls
    through to the wrapped model (``config``, ``generate`` ...); ``save_pretrained`` writes the adapter."""

    def __init__(self, base_model: nn.Module, options: dict):
        super().__init__()
        self.base_model = base_model
        self.spectral_options = dict(options)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base_model":
                raise
            return getattr(self.base_model, name)

    def forward(self, *args, **kwargs):
        return self.base_model(*args, **kwargs)

    def adapter_layers(self) -> dict[str, SpectralMoELinear]:
        """Module name (relative to the wrapped model) -> adapted layer."""
        return {n: m for n, m in self.base_model.named_modules() if isinstance(m, SpectralMoELinear)}

    def gradient_checkpointing_enable(self, **kwargs):
        kwargs.setdefault("gradient_checkpointing_kwargs", {"use_reentrant": False})
        return self.base_model.gradient_checkpointing_enable(**kwargs)

    @contextmanager
    def disable_adapter(self):
        """The base model: every adapted layer returns W0 x + b exactly."""
        with self._set_on_layers("disabled", True):
            yield self

    @contextmanager
    def routing(self, mode: str):
        """``topk`` (the router) or ``uniform`` (every expert at weight 1/N: the expectation over a
        uniform router's top-k choice)."""
        if mode not in ROUTINGS:
            raise MechmedError(f"routing {mode!r}: use one of {', '.join(ROUTINGS)}")
        with self._set_on_layers("routing", mode):
            yield self

    @contextmanager
    def _set_on_layers(self, attr: str, value):
        """Set ``attr`` on every adapted layer for the block; restore each layer's own value after."""
        layers = list(self.adapter_layers().values())
        before = [getattr(m, attr) for m in layers]
        try:
            for m in layers:
                setattr(m, attr, value)
            yield
        finally:
            for m, b in zip(layers, before):
                setattr(m, attr, b)

    def unload(self) -> nn.Module:
        """Put the original linear layers back and return the wrapped model."""
        for name, m in self.adapter_layers().items():
            parent, _, child = name.rpartition(".")
            setattr(self.base_model.get_submodule(parent) if parent else self.base_model, child, m.base_layer)
        return self.base_model

    def save_pretrained(self, path: str | os.PathLike, **_) -> Path:
        """Write ``spectral_config.json``, ``adapter_model.safetensors`` (no base weights) and a README."""
        from safetensors.torch import save_file

        from mechmed.io import ensure_dir, follow_umask, write_json, write_text

        path = ensure_dir(Path(path))
        layers = self.adapter_layers()
        tensors = {}
        for name, m in layers.items():
            for key in _SAVED:
                tensors[f"{name}.{key}"] = _tensor(m, key)
        save_file({k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}, str(path / WEIGHTS_FILE))
        modules = {name: {"scale": m.scale, "in_features": m.in_features, "out_features": m.out_features,
                          "segments": m.segments, "compensation": m.compensation} for name, m in layers.items()}
        write_json(path / CONFIG_FILE, {"adapter_type": ADAPTER_TYPE, "format_version": FORMAT_VERSION,
                                        **self.spectral_options, "modules": modules})
        write_text(path / "README.md", README)
        follow_umask(path)
        return path


def _softmax_last(x: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim. On the CPU, torch's kernel for a last dim under 16 entries (the
    experts) is ~10x slower than the same softmax over a leading dim, so it runs over one there."""
    if x.device.type == "cpu" and x.shape[-1] < 16:
        return x.movedim(-1, 0).softmax(0).movedim(0, -1)
    return x.softmax(-1)


def _tensor(layer: SpectralMoELinear, key: str) -> torch.Tensor:
    return layer.get_buffer(key) if key.startswith("init_") else layer.get_parameter(key)


def spectral_config_file(adapter_dir: str | os.PathLike) -> Path | None:
    """The config file of the spectral adapter in ``adapter_dir`` (``spectral_config.json``, or a
    format-1 ``adapter_config.json`` whose ``adapter_type`` says so); None when it is not one."""
    for name in (CONFIG_FILE, LEGACY_CONFIG_FILE):
        p = Path(adapter_dir) / name
        if not p.is_file():
            continue
        try:
            if json.loads(p.read_text()).get("adapter_type") == ADAPTER_TYPE:
                return p
        except (ValueError, AttributeError):
            pass
    return None


def is_spectral_adapter(adapter_dir: str | os.PathLike) -> bool:
    return spectral_config_file(adapter_dir) is not None


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def target_names(bundle, layers: Sequence[int], targets: Sequence[str]) -> list[str]:
    """Names of the linear modules ``targets`` inside decoder ``layers`` (one per layer and target)."""
    names, missing = [], []
    for layer in layers:
        prefix = bundle.family.layer_path(layer)
        block = bundle.family.get_module(bundle.model, prefix)
        for target in targets:
            found = [f"{prefix}.{n}" for n, m in block.named_modules()
                     if (n == target or n.endswith("." + target)) and isinstance(m, (nn.Linear, SpectralMoELinear))]
            if len(found) != 1:
                missing.append(f"{target} in layer {layer} ({len(found)} matches)")
            names.extend(found)
    expected = len(layers) * len(targets)
    if missing or len(names) != expected:
        raise MechmedError(f"config option target_modules: matched {len(names)} linear modules, expected {expected} "
                           f"({len(layers)} layers × {len(targets)} modules); not matched once: {missing[:3]}")
    return names


def apply_spectral_adapter(bundle, cfg):
    """Replace ``cfg.target_modules`` of decoder ``cfg.layers`` with spectral experts.

    Returns (:class:`SpectralMoEModel`, names of the adapted modules). Only the experts and routers
    are trainable; the bundle's model is frozen and modified in place (as peft does).
    """
    sp = cfg.spectral
    fixed = check_options(sp.n_experts, sp.top_k, cfg.rank, sp.init, sp.scaling, sp.damping, sp.lr_ratio)
    model = bundle.model
    if isinstance(model, SpectralMoEModel):
        raise MechmedError("this model already carries a spectral_moe adapter; load the base model again")
    names = target_names(bundle, cfg.layers, cfg.target_modules)
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(int(cfg.seed))
    for name in names:
        base = model.get_submodule(name)
        scale = fixed if fixed is not None else rule_scale(base.in_features, cfg.rank // sp.n_experts, sp.lr_ratio)
        _replace(model, name, SpectralMoELinear(base, n_experts=sp.n_experts, top_k=sp.top_k, rank=cfg.rank,
                                                scale=scale, init=sp.init, damping=sp.damping, generator=generator))
    options = {"n_experts": sp.n_experts, "top_k": sp.top_k, "rank": cfg.rank, "init": sp.init,
               "scaling": sp.scaling, "damping": sp.damping, "lr_ratio": sp.lr_ratio,
               "layers": list(cfg.layers), "target_modules": list(cfg.target_modules)}
    return SpectralMoEModel(model, options), names


def load_spectral_adapter(model: nn.Module, adapter_dir: str | os.PathLike) -> SpectralMoEModel:
    """Attach a saved spectral adapter to ``model`` (the base model it was trained on)."""
    from safetensors.torch import load_file

    adapter_dir = Path(adapter_dir)
    config_file = spectral_config_file(adapter_dir)
    if config_file is None:
        raise MechmedError(f"--adapter {adapter_dir}: no {CONFIG_FILE} with adapter_type {ADAPTER_TYPE} there"
                           + ("; it is a peft adapter: load it with mechmed.models.attach_adapter or "
                              "peft.PeftModel.from_pretrained" if (adapter_dir / LEGACY_CONFIG_FILE).is_file() else
                              "; give a directory written by mechmed train with method spectral_moe"))
    conf = json.loads(config_file.read_text())
    if conf.get("format_version", 0) > FORMAT_VERSION:
        raise MechmedError(f"--adapter {adapter_dir}: written by a newer mechmed (format "
                           f"{conf['format_version']}); upgrade mechmed")
    if not (adapter_dir / WEIGHTS_FILE).is_file():
        raise MechmedError(f"--adapter {adapter_dir}: no {WEIGHTS_FILE} there")
    weights = load_file(str(adapter_dir / WEIGHTS_FILE))
    for p in model.parameters():
        p.requires_grad_(False)
    for name, meta in conf["modules"].items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise MechmedError(f"--adapter {adapter_dir}: the model has no module {name!r}; load the base model "
                               "the adapter was trained on") from None
        if not isinstance(base, nn.Linear) or (base.in_features, base.out_features) != (meta["in_features"],
                                                                                            meta["out_features"]):
            raise MechmedError(f"--adapter {adapter_dir}: module {name!r} does not match the adapter's shape "
                               f"({meta['in_features']} -> {meta['out_features']}); wrong base model?")
        layer = SpectralMoELinear(base, n_experts=conf["n_experts"], top_k=conf["top_k"], rank=conf["rank"],
                                  scale=meta["scale"], init="load", damping=conf.get("damping", 1.0))
        layer.init = conf["init"]
        layer.compensation = meta.get("compensation", "routed" if conf.get("format_version", 1) >= 2 else "mean")
        if layer.compensation not in COMPENSATIONS:
            raise MechmedError(f"--adapter {adapter_dir}: module {name!r} has compensation {layer.compensation!r}; "
                               f"this mechmed knows {', '.join(COMPENSATIONS)}: upgrade mechmed")
        layer.segments = [tuple(s) for s in meta["segments"]] if meta.get("segments") else None
        with torch.no_grad():
            for key in _SAVED:
                _tensor(layer, key).copy_(weights[f"{name}.{key}"])
        _replace(model, name, layer)
    options = {k: v for k, v in conf.items() if k not in ("adapter_type", "format_version", "modules")}
    return SpectralMoEModel(model, options).eval()


# ---------------------------------------------------------------- losses and statistics

def balance_loss(model) -> torch.Tensor:
    """Mean over adapted layers of N·Σ f_i·P_i from each layer's last training forward (1.0 when
    perfectly balanced; 0 when no layer ran in training mode). Each value is used once."""
    values = []
    for m in model.modules():
        if isinstance(m, SpectralMoELinear) and m._balance is not None:
            values.append(m._balance)
            m._balance = None
    if not values:
        return torch.zeros(())
    return torch.stack(values).mean()


@contextmanager
def _counting(model):
    layers = [m for m in model.modules() if isinstance(m, SpectralMoELinear)]
    try:
        for m in layers:
            m._counts = torch.zeros(m.n_experts, dtype=torch.float64)
        yield layers
    finally:
        for m in layers:
            m._counts = None
            m._token_mask = None


def expert_utilisation(model, bundle, pairs, *, batch_size: int = 16) -> dict:
    """Fraction of (non-padding) tokens routed to each expert, over both phrasings of ``pairs``.

    Returns ``{"n_experts", "top_k", "tokens", "modules": {name: [fraction per expert]},
    "layers": {layer: [mean over the layer's modules]}}``; fractions are of top-k assignments, so
    each row sums to 1 (uniform use: 1/N each).
    """
    from mechmed.data.images import load_image
    from mechmed.readout import build_inputs

    if not isinstance(model, SpectralMoEModel):
        raise MechmedError("expert_utilisation needs a model with a spectral_moe adapter")
    names = {id(m): n for n, m in model.adapter_layers().items()}
    use_images = bundle.multimodal and all(p.image is not None for p in pairs)
    prompts = [(p.question, p.image) for p in pairs] + [(p.paraphrase, p.image) for p in pairs]
    cache: dict = {}
    tokens = 0
    was_training = model.training
    model.eval()
    with _counting(model) as layers, torch.inference_mode():
        for i in range(0, len(prompts), batch_size):
            chunk = prompts[i:i + batch_size]
            imgs = None
            if use_images:
                for _, im in chunk:
                    if im not in cache:
                        cache[im] = load_image(im)
                imgs = [cache[im] for _, im in chunk]
            inputs = build_inputs(bundle.processor, [q for q, _ in chunk], imgs).to(bundle.device)
            mask = inputs["attention_mask"].bool()
            tokens += int(mask.sum())
            for m in layers:
                m._token_mask = mask
            model(**inputs, logits_to_keep=1, use_cache=False)
        modules = {names[id(m)]: (m._counts / m._counts.sum().clamp_min(1)).tolist() for m in layers}
    model.train(was_training)
    prefix = bundle.family.layers + "."
    per_layer: dict[int, list] = {}
    for name, frac in modules.items():
        layer = int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else -1
        per_layer.setdefault(layer, []).append(frac)
    layers_mean = {k: [sum(col) / len(v) for col in zip(*v)] for k, v in sorted(per_layer.items())}
    first = next(iter(model.adapter_layers().values()))
    return {"n_experts": first.n_experts, "top_k": first.top_k, "tokens": tokens, "modules": modules,
            "layers": layers_mean}


def init_margin_deviation(model, bundle, pairs, *, batch_size: int = 16) -> dict:
    """How far the adapted model's yes/no margins are from the base model's (at initialisation: zero up
    to float rounding, by the routed compensation).

    Over both phrasings of ``pairs`` with the model's router (top-k): ``max_abs`` and ``mean_abs`` of
    (adapted − base) margins, ``sign_changes`` (answers that differ), ``base_mean_abs_margin`` for scale.
    """
    import numpy as np

    from mechmed.readout import pair_margins

    adapted = bundle.__class__(model, bundle.processor, bundle.family, bundle.answers, bundle.name)
    was_training = model.training
    model.eval()
    try:
        def run():
            mq, mp, *_ = pair_margins(adapted, pairs, batch_size=batch_size)
            return np.concatenate([mq, mp]).astype(np.float64)

        with model.disable_adapter():
            base = run()
        routed = run()
    finally:
        model.train(was_training)
    d = np.abs(routed - base)
    return {"n_margins": int(base.size), "max_abs": float(d.max()), "mean_abs": float(d.mean()),
            "base_mean_abs_margin": float(np.abs(base).mean()),
            "sign_changes": int((np.sign(routed) != np.sign(base)).sum())}
