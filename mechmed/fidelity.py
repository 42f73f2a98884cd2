"""Do SAEs reconstruct a model's activations? Per-layer, per-prompt fidelity and the sae-check.

Metrics, per layer and prompt set, over the positions :func:`mechmed.saes.token_mask` keeps (real
tokens, BOS excluded; image tokens included), x the resid_post activation, x̂ = decode(encode(x)):

- **R²** (explained variance) = 1 − Σ‖x − x̂‖² / Σ‖x − μ‖², μ the mean activation over the *whole
  evaluated set* (predicting μ for every token gives exactly 0). Two are reported, both in every row
  (:data:`R2_DEFINITIONS`, copied into each row as ``r2_definitions``):
  ``r2_pooled`` sums numerator and denominator over all evaluated tokens (token-weighted; sae-lens's
  ``ExplainedVarianceCalculator`` computes the same); ``r2`` is the mean over prompts of R²ᵢ, which
  sums over prompt i's tokens with the same global μ (prompt-weighted), and is the quantity tested.
  **FVU** = 1 − R² (``fvu`` = 1 − ``r2``, ``fvu_pooled`` = 1 − ``r2_pooled``).
- **L0**: mean number of nonzero latents per token. **cosine**: mean cos(x, x̂) per token.
- **By token type** (``by_token_type``): pooled R², FVU and L0 over the text, image and special
  tokens apart (:func:`token_types`), each against its own mean, and over BOS, which the headline
  leaves out (its residual has a norm many times the others' in Gemma 3).
- **CE recovered** (``ce=True``) = (CE_zero − CE_recon) / (CE_zero − CE_clean): next-token
  cross-entropy on the prompt tokens (image-token targets and BOS sources excluded) with the layer's
  output left as is (clean), replaced by x̂ (recon), or set to zero (zero) at the evaluated
  positions. 1 = the reconstruction loses nothing, 0 = as bad as deleting the layer's output.
- **CE recovered by token type** (``ce=True``; ``by_token_type[t]["ce_recovered"]``, with
  ``ce_recon`` and ``ce_zero``, for t in :data:`CE_TOKEN_TYPES`, text and image): the same ratio
  with x̂ (recon) or zero (zero) spliced in at the positions of type t only, x everywhere else,
  and the loss on the headline's targets (so CE_clean is the headline's). A batch without tokens of
  type t adds its clean loss to both; a type absent from every prompt gets null. Special tokens
  (turn markers, image delimiters; ``<unk>`` where a tokenizer has one) are not spliced apart, which
  would cost two more forwards per layer; their ``ce_recovered`` is null, as BOS's.
- **Massive dimensions** (``massive_dims``, k = ``top_dims``, default 5): with V_d = Σ_t (x_d − μ_d)²
  the variance dimension d carries and E_d = Σ_t (x_d − x̂_d)² its squared error (Σ_d V_d and Σ_d E_d
  are ``r2_pooled``'s denominator and numerator), ``dims`` are the k dimensions of largest V_d
  (largest first), ``shares`` their V_d / Σ V, ``variance_share`` = Σ_top V_d / Σ_d V_d,
  ``r2_without`` = 1 − Σ_rest E_d / Σ_rest V_d (numerator and denominator without the top k), and
  ``r2_standardised`` = 1 − Σ_d (E_d/σ_d²) / Σ_d (V_d/σ_d²), σ_d² = V_d/n the dimension's variance
  over the evaluated tokens: each dimension's residual and reconstruction divided by its std, which
  is the mean over dimensions of the per-dimension R²_d = 1 − E_d/V_d (dimensions that do not vary,
  V_d ≤ 10⁻⁹·Σ_t x_d², left out). A high ``r2_pooled`` with a low ``r2_without`` or
  ``r2_standardised`` says a few high-variance dimensions carry the R².
- **margin change** (``ce=True``, question prompts only): mean |m_spliced − m_clean| of the yes/no
  margin (:mod:`mechmed.readout`) when x̂ replaces x at the answer position only; ``margin_flips``
  counts sign changes.
- **The test** (the paper's): one-sided one-sample t test of mean per-prompt R² > ``threshold``
  (:func:`mechmed.stats.one_sample_ttest`, n = prompts); ``exceeds_threshold`` when p < ``alpha``.
  ``r2_ci`` is the matching two-sided 95% t interval of the mean, x̄ ± t₀.₉₇₅,ₙ₋₁·s/√n (a bootstrap
  would hold resamples × prompts values at once; the t interval keeps memory flat in n).

Cost and memory. Every layer is read in *one* forward pass per batch (one hook per Site). With
``ce=True`` each layer adds per batch two forwards (recon, zero), two for each type of
:data:`CE_TOKEN_TYPES` that holds some but not all of the batch's evaluated positions (a type that
holds all of them reuses the headline's splices, one that holds none the clean loss) and, for
question prompts, one more (the answer-position splice): ``forwards_per_batch = 1 + L·(2 + 2·T + q)``,
T ∈ {0, 1, 2}, q ∈ {0, 1}. Image + question prompts: 1 + 7L. Plain-text prompts: 1 + 2L where every
evaluated token is text (a real Gemma tokenizer's byte fallback), 1 + 4L where a batch also holds
special tokens (the demo's and the test models' tokenizers turn unseen words into ``<unk>``, a special
token).

Statistics stream: per layer (and per token type) Σ(x − c), Σ(x − c)² and Σ(x − x̂)² per dimension
(float64 d_model vectors), L0 and cosine sums (c a fixed reference, the first batch's mean, which
keeps the float64 sums well conditioned), and per prompt the scalar sums and Σ(x − c) (a float32
d_model vector, allocated once), so memory grows with prompts × layers × d_model (1000 prompts × 34
layers × 2560 for MedGemma-4B: 350 MB), never with tokens.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mechmed.errors import MechmedError
from mechmed.sites import Site

log = logging.getLogger(__name__)

TEXT_SETS = ("medical", "general", "images")
DEFAULT_TEXTS = "medical,general"
"""The prompt sets every model is checked on; ``images`` joins them for a source that ships images."""
N_IMAGE_PROMPTS = 100
ALPHA = 0.05
RESULT_VERSION = 1
TOP_DIMS = 5
"""Dimensions of largest variance set apart in ``massive_dims`` (``top_dims``)."""

R2_DEFINITIONS = {
    "r2": "mean over prompts of R²_i = 1 − Σ_i‖x − x̂‖² / Σ_i‖x − μ‖² (prompt i's tokens, μ the mean over all "
          "evaluated tokens); the quantity tested",
    "r2_pooled": "1 − Σ‖x − x̂‖² / Σ‖x − μ‖² over all evaluated tokens (token-weighted; sae-lens's explained "
                 "variance)",
    "by_token_type.r2_pooled": "r2_pooled over one token type's tokens, μ that type's mean",
    "massive_dims.r2_without": "r2_pooled with the top-k variance dimensions left out of numerator and denominator",
    "massive_dims.r2_standardised": "r2_pooled with each dimension divided by its std over the evaluated tokens "
                                    "(the mean over dimensions of the per-dimension R²)",
}
"""What each R² in a sae-check row is (the module docstring has the formulas); every row carries a copy."""


# ----------------------------------------------------------------------------- prompt sets


@dataclass(frozen=True)
class PromptSet:
    """Named prompts: plain texts, or questions with one image each (``images`` set)."""

    name: str
    texts: tuple
    images: tuple | None = None

    def __post_init__(self):
        if not self.texts:
            raise MechmedError(f"text set {self.name!r}: empty")
        if self.images is not None and len(self.images) != len(self.texts):
            raise MechmedError(f"text set {self.name!r}: {len(self.images)} images for {len(self.texts)} questions")

    @property
    def is_questions(self) -> bool:
        return self.images is not None

    def __len__(self) -> int:
        return len(self.texts)

    def inputs(self, bundle, start: int, stop: int):
        """The tokenised batch of prompts ``start:stop`` (left-padded)."""
        from mechmed.readout import build_inputs
        from mechmed.saes import text_inputs

        if self.images is None:
            return text_inputs(bundle.processor, self.texts[start:stop])
        if not bundle.multimodal:
            raise MechmedError(f"text set {self.name!r}: this model takes no images; drop {self.name} from --texts")
        return build_inputs(bundle.processor, list(self.texts[start:stop]), list(self.images[start:stop]))


def default_texts(model: str) -> str:
    """:data:`DEFAULT_TEXTS`, plus ``images`` when ``model`` is a source that ships image prompts."""
    from mechmed.sources import image_prompts

    return DEFAULT_TEXTS + (",images" if image_prompts(model) is not None else "")


def image_prompt_builder(model: str):
    """The image + question prompt builder of the source ``model``; an error when it ships none."""
    from mechmed.sources import image_prompts

    build = image_prompts(model)
    if build is None:
        raise MechmedError(f"--texts images: {model} ships no image prompts (the demo does); use --texts "
                           f"{DEFAULT_TEXTS}")
    return build


def prompt_set(name: str, *, seed: int = 0, n_images: int = N_IMAGE_PROMPTS, model: str = "demo") -> PromptSet:
    """A shipped prompt set: ``medical``, ``general`` (:mod:`mechmed.data.texts`) or ``images``
    (``n_images`` image + question prompts over the evaluation images of the source ``model``,
    :data:`mechmed.sources.Source.image_prompts`; the embedded default's by default)."""
    from mechmed.data.texts import text_set

    if name == "images":
        images, questions = image_prompt_builder(model)(n_images, seed, split="eval")
        return PromptSet(name, tuple(questions), tuple(images))
    if name not in TEXT_SETS:
        raise MechmedError(f"--texts {name}: unknown text set; choose from {', '.join(TEXT_SETS)}")
    return PromptSet(name, tuple(text_set(name)))


def parse_text_sets(texts: str | Sequence[str]) -> list[str]:
    """``"medical,general,images"`` -> names, each checked (unknown names and repeats are errors)."""
    names = [t.strip() for t in (texts.split(",") if isinstance(texts, str) else texts)]
    names = [t for t in names if t]
    if not names:
        raise MechmedError(f"--texts {texts!r}: empty; choose from {', '.join(TEXT_SETS)}")
    for t in names:
        if t not in TEXT_SETS:
            raise MechmedError(f"--texts {t}: unknown text set; choose from {', '.join(TEXT_SETS)}")
    if len(set(names)) != len(names):
        raise MechmedError(f"--texts {texts}: a text set is listed twice")
    return names


# ----------------------------------------------------------------------------- streaming statistics


@dataclass
class FidelitySummary:
    """What :meth:`ReconstructionStats.summary` returns for one layer and prompt set."""

    r2_pooled: float
    r2_per_prompt: np.ndarray
    l0: float
    cosine: float
    n_tokens: int
    n_prompts: int
    l0_per_prompt: np.ndarray = field(repr=False)
    var_per_dim: np.ndarray = field(repr=False, default=None)
    """V_d = Σ_t (x_d − μ_d)²: float64 [d]; sums to ``r2_pooled``'s denominator."""
    ssr_per_dim: np.ndarray = field(repr=False, default=None)
    """E_d = Σ_t (x_d − x̂_d)²: float64 [d]; sums to ``r2_pooled``'s numerator."""
    sum_x2_per_dim: np.ndarray = field(repr=False, default=None)
    """Σ_t x_d²: float64 [d] (tells a dimension that does not vary from one that rounding left)."""


class ReconstructionStats:
    """Streaming sufficient statistics of (x, x̂) for one layer: pooled and per prompt.

    Made for ``n_prompts`` prompts (its per-prompt sums are allocated once, so that a long run
    does not fragment the heap); call :meth:`add` once per batch with the evaluated tokens'
    activations, reconstructions, latent counts and prompt indices (0..n_prompts-1);
    :meth:`summary` computes R² against the global mean μ at the end, per prompt via
    Σᵢ‖x − μ‖² = Σᵢ‖x − c‖² − 2(μ − c)·Σᵢ(x − c) + nᵢ‖μ − c‖², and per dimension via
    Σ(x_d − μ_d)² = Σ(x_d − c_d)² − n(μ_d − c_d)².
    """

    _SCALARS = ("n", "ssr", "sq", "l0", "cos")

    def __init__(self, n_prompts: int):
        import torch

        self.n_prompts = int(n_prompts)
        self.ref = None
        self.n = 0
        self.sum_xc = None
        self.sum_sq_d = None  # Σ(x − c)² per dimension, float64 [d]
        self.ssr_d = None  # Σ(x − x̂)² per dimension, float64 [d]
        self.sum_sq = 0.0
        self.ssr = 0.0
        self.l0_sum = 0.0
        self.cos_sum = 0.0
        self._scalars = torch.zeros(self.n_prompts, len(self._SCALARS), dtype=torch.float64)
        self._xc = None  # [n_prompts, d] float32 Σ(x − c) per prompt

    def add(self, x, x_hat, l0, prompt_index) -> None:
        """``x``, ``x_hat``: [tokens, d]; ``l0``: [tokens] active latents; ``prompt_index``:
        [tokens] prompt of each token, in 0..n_prompts-1."""
        import torch

        x = x.detach().to("cpu", torch.float64)
        xh = x_hat.detach().to("cpu", torch.float64)
        idx = prompt_index.detach().to("cpu", torch.long)
        if idx.numel() and int(idx.max()) >= self.n_prompts:
            raise ValueError(f"prompt index {int(idx.max())} >= n_prompts {self.n_prompts}")
        if self.ref is None:
            self.ref = x.mean(0) if x.shape[0] else torch.zeros(x.shape[1], dtype=torch.float64)
            self.sum_xc = torch.zeros_like(self.ref)
            self.sum_sq_d = torch.zeros_like(self.ref)
            self.ssr_d = torch.zeros_like(self.ref)
            self._xc = torch.zeros(self.n_prompts, x.shape[1], dtype=torch.float32)
        xc = x - self.ref
        err2, xc2 = (x - xh).pow(2), xc.pow(2)
        err, sq = err2.sum(-1), xc2.sum(-1)
        self.ssr_d += err2.sum(0)
        self.sum_sq_d += xc2.sum(0)
        cos = torch.nn.functional.cosine_similarity(x, xh, dim=-1, eps=1e-12)
        l0 = l0.detach().to("cpu", torch.float64)
        self.n += int(x.shape[0])
        self.sum_xc += xc.sum(0)
        self.sum_sq += float(sq.sum())
        self.ssr += float(err.sum())
        self.l0_sum += float(l0.sum())
        self.cos_sum += float(cos.sum())
        self._scalars.index_add_(0, idx, torch.stack([torch.ones_like(err), err, sq, l0, cos], 1))
        self._xc.index_add_(0, idx, xc.to(torch.float32))

    def summary(self) -> FidelitySummary:
        if self.n == 0:
            raise MechmedError("no tokens were evaluated: every prompt is empty after dropping padding and BOS")
        delta = (self.sum_xc / self.n).numpy()
        dd = float(delta @ delta)
        sst = self.sum_sq - self.n * dd
        r2_pooled = 1.0 - self.ssr / sst if sst > 0 else float("nan")
        p = dict(zip(self._SCALARS, self._scalars.numpy().T))
        keep = p["n"] > 0
        sst_p = p["sq"] - 2.0 * (self._xc.numpy().astype(np.float64) @ delta) + p["n"] * dd
        with np.errstate(divide="ignore", invalid="ignore"):
            r2_p = np.where(sst_p > 0, 1.0 - p["ssr"] / sst_p, np.nan)
            l0_p = p["l0"] / p["n"]
        r2_p, l0_p = r2_p[keep], l0_p[keep]
        c, sum_xc = self.ref.numpy(), self.sum_xc.numpy()
        var_d = np.maximum(self.sum_sq_d.numpy() - self.n * delta**2, 0.0)
        x2_d = self.sum_sq_d.numpy() + 2.0 * c * sum_xc + self.n * c**2
        return FidelitySummary(r2_pooled=float(r2_pooled), r2_per_prompt=r2_p, l0=self.l0_sum / self.n,
                               cosine=self.cos_sum / self.n, n_tokens=self.n, n_prompts=int(keep.sum()),
                               l0_per_prompt=l0_p, var_per_dim=var_d, ssr_per_dim=self.ssr_d.numpy().copy(),
                               sum_x2_per_dim=x2_d)


def massive_dims(summ: FidelitySummary, k: int = TOP_DIMS) -> dict:
    """The ``k`` dimensions of largest variance V_d over the evaluated tokens and how much of R² they
    carry: ``{"k", "dims", "shares", "variance_share", "r2_without", "r2_standardised"}`` (the module
    docstring defines each; ``r2_without`` is null when no other dimension varies, ``shares`` and
    ``variance_share`` when none varies at all)."""
    var, err, x2 = summ.var_per_dim, summ.ssr_per_dim, summ.sum_x2_per_dim
    k = min(int(k), var.size)
    top = np.argsort(-var, kind="stable")[:k]
    rest = np.ones(var.size, dtype=bool)
    rest[top] = False
    total, v_rest = float(var.sum()), float(var[rest].sum())
    varies = var > 1e-9 * x2
    return {
        "k": k, "dims": [int(d) for d in top],
        "shares": [float(v / total) for v in var[top]] if total > 0 else None,
        "variance_share": float(var[top].sum() / total) if total > 0 else None,
        "r2_without": 1.0 - float(err[rest].sum()) / v_rest if v_rest > 0 else None,
        "r2_standardised": 1.0 - float(np.mean(err[varies] / var[varies])) if varies.any() else None,
    }


def explained_variance(x, x_hat) -> float:
    """R² = 1 − Σ‖x − x̂‖² / Σ‖x − μ‖² over the rows of ``x`` ([tokens, d]), μ their mean."""
    import torch

    s = ReconstructionStats(1)
    s.add(x, x_hat, torch.zeros(x.shape[0]), torch.zeros(x.shape[0], dtype=torch.long))
    return s.summary().r2_pooled


# ----------------------------------------------------------------------------- evaluation


def _sae_apply(sae, x):
    """(x̂, active latents per token) for x [tokens, d] in the SAE's dtype."""
    dtype = next(sae.parameters()).dtype
    feats = sae.encode(x.to(dtype))
    return sae.decode(feats), (feats != 0).sum(-1)


def _ce_sums(logits, input_ids, valid):
    """Σ next-token cross-entropy over ``valid`` [b, T-1] targets, and their count."""
    import torch

    lp = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), input_ids[:, 1:].flatten(),
                                           reduction="none").view(valid.shape)
    return float((lp * valid).sum()), int(valid.sum())


def _ce_targets(bundle, inputs, mask):
    """[b, T-1] bool: targets scored by CE (source evaluated, target a real, non-image token)."""
    ids = inputs["input_ids"]
    valid = mask[:, :-1] & inputs["attention_mask"][:, 1:].bool()
    cfg = bundle.model.config
    for key in ("image_token_id", "image_token_index"):
        tok = getattr(cfg, key, None)
        if isinstance(tok, int):
            valid = valid & (ids[:, 1:] != tok)
    return valid


def _recovered(clean: float, recon: float, zero: float) -> float | None:
    """(CE_zero − CE_recon) / (CE_zero − CE_clean); None where zeroing does not change the loss."""
    return (zero - recon) / (zero - clean) if abs(zero - clean) > 1e-12 else None


#: Token types whose CE recovered is measured with the splice at their positions only.
CE_TOKEN_TYPES = ("text", "image")


@dataclass
class _Interventions:
    ce: dict = field(default_factory=lambda: {"clean": 0.0, "recon": 0.0, "zero": 0.0})
    ce_type: dict = field(default_factory=lambda: {t: {"recon": 0.0, "zero": 0.0} for t in CE_TOKEN_TYPES})
    ce_tokens: int = 0
    margin_delta: list = field(default_factory=list)
    flips: int = 0

    def summary(self) -> dict:
        out: dict[str, Any] = {"ce_clean": None, "ce_recon": None, "ce_zero": None, "ce_recovered": None,
                               "margin_change": None, "margin_flips": None}
        if self.ce_tokens:
            c, r, z = (self.ce[k] / self.ce_tokens for k in ("clean", "recon", "zero"))
            out.update(ce_clean=c, ce_recon=r, ce_zero=z, ce_recovered=_recovered(c, r, z))
        if self.margin_delta:
            d = np.concatenate(self.margin_delta)
            out.update(margin_change=float(np.abs(d).mean()), margin_flips=self.flips)
        return out

    def type_summary(self) -> dict:
        """{type: {ce_recon, ce_zero, ce_recovered}} with the splice at that type's positions only
        (empty without CE)."""
        if not self.ce_tokens:
            return {}
        c = self.ce["clean"] / self.ce_tokens
        out = {}
        for t, sums in self.ce_type.items():
            r, z = sums["recon"] / self.ce_tokens, sums["zero"] / self.ce_tokens
            out[t] = {"ce_recon": r, "ce_zero": z, "ce_recovered": _recovered(c, r, z)}
        return out


#: Token types whose R² is reported apart (``by_token_type``); ``bos`` is outside the headline.
TOKEN_TYPES = ("text", "image", "special", "bos")


def token_types(bundle, inputs) -> dict:
    """{type: [batch, pos] bool} over the real tokens of ``inputs``: ``image`` (the image soft
    tokens), ``special`` (the tokenizer's special tokens other than BOS and padding: turn markers,
    image delimiters), ``bos``, and ``text`` (every other real token). Each real token has one type."""
    import torch

    from mechmed.capture import image_token_mask

    ids = inputs["input_ids"]
    real = inputs["attention_mask"].bool()
    tok = bundle.tokenizer
    bos_id = getattr(tok, "bos_token_id", None)
    bos = real & (ids == bos_id) if bos_id is not None else torch.zeros_like(real)
    image = real & image_token_mask(bundle, inputs)
    specials = sorted(set(getattr(tok, "all_special_ids", []) or []) - {bos_id})
    special = real & torch.isin(ids, torch.tensor(specials, device=ids.device, dtype=ids.dtype)) & ~image \
        if specials else torch.zeros_like(real)
    return {"text": real & ~(bos | image | special), "image": image, "special": special, "bos": bos}


def _type_summary(stats: dict) -> dict:
    """{type: token count, pooled R² and FVU (None where the type's activations do not vary, as
    BOS's do not), relative error Σ‖x − x̂‖² / Σ‖x‖², RMS norm √(Σ‖x‖²/n) and L0} of the types that
    had tokens."""
    out = {}
    for name, st in stats.items():
        if st.n == 0:
            continue
        summ = st.summary()
        c, delta = st.ref, st.sum_xc / st.n
        sum_x2 = st.sum_sq + 2.0 * float(c @ st.sum_xc) + st.n * float(c @ c)
        sst = st.sum_sq - st.n * float(delta @ delta)
        # a type whose activations do not vary (BOS: one token at one position) has no R², whatever
        # rounding leaves in its variance
        r2 = summ.r2_pooled if math.isfinite(summ.r2_pooled) and sst > 1e-9 * sum_x2 else None
        out[name] = {"n_tokens": summ.n_tokens, "r2_pooled": r2, "fvu_pooled": None if r2 is None else 1.0 - r2,
                     "relative_error": st.ssr / sum_x2 if sum_x2 > 0 else None,
                     "rms_norm": math.sqrt(sum_x2 / st.n), "l0": summ.l0}
    return out


@dataclass
class SetEvaluation:
    """:func:`evaluate_saes` on one prompt set: rows (one per layer) and what it cost."""

    rows: list
    n_batches: int
    n_forwards: int
    n_tokens: int
    seconds: float

    @property
    def forwards_per_batch(self) -> float:
        return self.n_forwards / max(1, self.n_batches)


def _row(layer: int, name: str, summ: FidelitySummary, inter: _Interventions, threshold: float, alpha: float, sae,
         by_type: dict | None = None, top_dims: int = TOP_DIMS) -> dict:
    from scipy import stats as sps

    from mechmed.saes import sae_hook_name
    from mechmed.stats import one_sample_ttest

    r2s = summ.r2_per_prompt[np.isfinite(summ.r2_per_prompt)]
    if r2s.size == 0:
        raise MechmedError(f"layer {layer}, text set {name}: no prompt has a defined R² (zero variance)")
    mean = float(r2s.mean())
    if r2s.size >= 2:
        test = one_sample_ttest(r2s, threshold, alternative="greater")
        half = float(sps.t.ppf(0.975, r2s.size - 1) * r2s.std(ddof=1) / math.sqrt(r2s.size))
        p_value, t_stat, ci = test.p_value, test.statistic, [mean - half, mean + half]
    else:
        p_value, t_stat, ci = None, None, [mean, mean]
    by_type = {t: dict(v) for t, v in (by_type or {}).items()}
    ce_type = inter.type_summary()
    for t, entry in by_type.items():  # CE by type only where it was measured; null for the others
        entry.update(ce_type.get(t, {"ce_recon": None, "ce_zero": None, "ce_recovered": None}))
    return {
        "layer": layer, "text_set": name, "n_prompts": int(r2s.size), "n_tokens": summ.n_tokens,
        "r2": mean, "r2_ci": ci, "r2_pooled": summ.r2_pooled, "r2_min": float(r2s.min()),
        "fvu": 1.0 - mean, "fvu_pooled": 1.0 - summ.r2_pooled,
        "l0": summ.l0, "cosine": summ.cosine, **inter.summary(),
        "threshold": threshold, "t_statistic": t_stat, "p_value": p_value, "alpha": alpha,
        "exceeds_threshold": bool(p_value is not None and p_value < alpha and mean > threshold),
        "d_sae": int(sae.cfg.d_sae), "sae_hook": sae_hook_name(sae), "by_token_type": by_type,
        "massive_dims": massive_dims(summ, top_dims), "r2_definitions": dict(R2_DEFINITIONS),
    }


def evaluate_saes(bundle, saes: dict, prompts: PromptSet, *, batch_size: int = 8, ce: bool = True,
                  threshold: float = 0.95, alpha: float = ALPHA, top_dims: int = TOP_DIMS,
                  progress: str | None = None) -> SetEvaluation:
    """Fidelity of ``saes`` ({layer: SAE}, checked by :func:`mechmed.saes.check_sae`) on ``prompts``:
    one row per layer (see the module docstring for every field); ``top_dims`` is the k of
    ``massive_dims``."""
    import torch

    from mechmed.capture import hooks
    from mechmed.progress import progress_bar
    from mechmed.readout import yes_no_logits
    from mechmed.saes import token_mask

    if batch_size < 1:
        raise MechmedError(f"--batch-size {batch_size}: must be at least 1")
    if isinstance(top_dims, bool) or not isinstance(top_dims, (int, np.integer)) or top_dims < 0:
        raise MechmedError(f"top_dims {top_dims!r}: give a whole number of dimensions, 0 or more (default "
                           f"{TOP_DIMS})")
    layers = sorted(saes)
    sites = {L: Site(L) for L in layers}
    for s in sites.values():
        s.check(bundle.n_layers)
    stats = {L: ReconstructionStats(len(prompts)) for L in layers}
    typed = {L: {t: ReconstructionStats(1) for t in TOKEN_TYPES} for L in layers}  # pooled only: no per-prompt sums
    inter = {L: _Interventions() for L in layers}
    model, family = bundle.model, bundle.family
    n_forwards = n_batches = n_tokens = 0
    t0 = time.perf_counter()
    starts = range(0, len(prompts), batch_size)

    def forward(inputs, fns, full_logits):
        nonlocal n_forwards
        n_forwards += 1
        with hooks(model, family, fns):
            return model(**inputs, use_cache=False, logits_to_keep=0 if full_logits else 1).logits

    with torch.inference_mode():
        for start in progress_bar(starts, desc=progress, total=len(starts)):
            inputs = prompts.inputs(bundle, start, start + batch_size).to(bundle.device)
            mask = token_mask(inputs, bundle.tokenizer)
            types = token_types(bundle, inputs)
            b = int(mask.shape[0])
            rows = torch.arange(b, device=mask.device)[:, None].expand_as(mask)[mask]
            acts: dict[int, Any] = {}

            def keep(site, act, store=acts):
                store[site.layer] = act

            logits = forward(inputs, {sites[L]: keep for L in layers}, ce)
            n_batches += 1
            n_tokens += int(mask.sum())
            recon_full = {}
            for L in layers:
                x = acts[L][mask]
                if not torch.isfinite(x).all():
                    bad = int(rows[(~torch.isfinite(x)).any(-1)][0]) + start
                    raise MechmedError(f"layer {L}, text set {prompts.name}, prompt {bad}: activations contain "
                                       "NaN/inf; check the model weights and --dtype")
                x_hat, l0 = _sae_apply(saes[L], x)
                stats[L].add(x, x_hat, l0, rows + start)
                in_mask = {t: m[mask] for t, m in types.items() if t != "bos"}  # positions within x
                for t, sel in in_mask.items():
                    if sel.any():
                        typed[L][t].add(x[sel], x_hat[sel], l0[sel], torch.zeros_like(rows[sel]))
                if types["bos"].any():  # outside the headline: BOS carries a large-norm residual
                    xb = acts[L][types["bos"]]
                    xb_hat, l0b = _sae_apply(saes[L], xb)
                    typed[L]["bos"].add(xb, xb_hat, l0b, torch.zeros(xb.shape[0], dtype=torch.long))
                if ce:
                    full = acts[L].clone()
                    full[mask] = x_hat.to(full.dtype)
                    recon_full[L] = full
            if not ce:
                continue
            valid = _ce_targets(bundle, inputs, mask)
            ids = inputs["input_ids"]
            clean_ce, count = _ce_sums(logits, ids, valid)
            n_eval = int(mask.sum())
            type_pos = {t: types[t] & mask for t in CE_TOKEN_TYPES}
            clean_margin = None
            if prompts.is_questions:
                s = yes_no_logits(logits[:, -1], bundle.answers)
                clean_margin = (s[:, 0] - s[:, 1]).float().cpu().numpy()
            for L in layers:
                rec = recon_full[L]
                zero = acts[L].masked_fill(mask[..., None], 0)
                it = inter[L]
                it.ce_tokens += count
                it.ce["clean"] += clean_ce
                recon_ce = _ce_sums(forward(inputs, {sites[L]: lambda s, a, r=rec: r}, True), ids, valid)[0]
                zero_ce = _ce_sums(forward(inputs, {sites[L]: lambda s, a, z=zero: z}, True), ids, valid)[0]
                it.ce["recon"] += recon_ce
                it.ce["zero"] += zero_ce
                for t, at in type_pos.items():  # the splice at this type's positions only
                    n_t = int(at.sum())
                    if n_t == 0:  # nothing of this type here: the loss stays clean
                        r_t, z_t = clean_ce, clean_ce
                    elif n_t == n_eval:  # every evaluated position is of this type: the headline's splices
                        r_t, z_t = recon_ce, zero_ce
                    else:
                        sel = at[..., None]
                        rec_t, zero_t = torch.where(sel, rec, acts[L]), acts[L].masked_fill(sel, 0)
                        r_t = _ce_sums(forward(inputs, {sites[L]: lambda s, a, v=rec_t: v}, True), ids, valid)[0]
                        z_t = _ce_sums(forward(inputs, {sites[L]: lambda s, a, v=zero_t: v}, True), ids, valid)[0]
                    it.ce_type[t]["recon"] += r_t
                    it.ce_type[t]["zero"] += z_t
                if clean_margin is not None:
                    last = acts[L].clone()
                    last[:, -1] = rec[:, -1]
                    out = forward(inputs, {sites[L]: lambda s, a, v=last: v}, False)
                    sc = yes_no_logits(out[:, -1], bundle.answers)
                    m = (sc[:, 0] - sc[:, 1]).float().cpu().numpy()
                    it.margin_delta.append(m - clean_margin)
                    it.flips += int(np.sum(np.sign(m) != np.sign(clean_margin)))
    seconds = time.perf_counter() - t0
    out_rows = [_row(L, prompts.name, stats[L].summary(), inter[L], threshold, alpha, saes[L],
                     _type_summary(typed[L]), top_dims) for L in layers]
    return SetEvaluation(out_rows, n_batches, n_forwards, n_tokens, seconds)


# ----------------------------------------------------------------------------- the sae-check


def _fmt(v, spec: str) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def format_table(rows: Sequence[dict]) -> str:
    """A plain-text table of sae-check rows (for the CLI and the benchmark), its R² columns named in
    two last lines: ``R2 mean`` is ``r2`` (with its 95% CI), ``R2 pool`` ``r2_pooled``, ``R2-topk`` and
    ``R2 stdz`` the ``massive_dims`` R² without the top-k variance dimensions and standardised."""
    ks = {(r.get("massive_dims") or {}).get("k") for r in rows} - {None}
    k = str(ks.pop()) if len(ks) == 1 else "k"
    head = f"{'layer':>5} {'text_set':<8} {'n':>4} {'R2 mean':>7} {'95% CI':>17} {'R2 pool':>7} " \
           f"{'R2-top' + k:>7} {'R2 stdz':>7} {'L0':>6} {'cos':>6} {'CE rec':>7} {'|dm|':>6} {'p':>8} {'>thr':>5}"
    lines = [head]
    for r in rows:
        ci = r.get("r2_ci") or [None, None]
        md = r.get("massive_dims") or {}
        lines.append(
            f"{r['layer']:>5} {r['text_set']:<8} {r['n_prompts']:>4} {_fmt(r['r2'], '.4f'):>7} "
            f"{'[' + _fmt(ci[0], '.4f') + ', ' + _fmt(ci[1], '.4f') + ']':>17} "
            f"{_fmt(r.get('r2_pooled'), '.4f'):>7} {_fmt(md.get('r2_without'), '.4f'):>7} "
            f"{_fmt(md.get('r2_standardised'), '.4f'):>7} {_fmt(r['l0'], '.1f'):>6} "
            f"{_fmt(r['cosine'], '.3f'):>6} {_fmt(r.get('ce_recovered'), '.3f'):>7} "
            f"{_fmt(r.get('margin_change'), '.3f'):>6} {_fmt(r['p_value'], '.2g'):>8} "
            f"{'yes' if r['exceeds_threshold'] else 'no':>5}"
        )
    lines.append("R2 mean: mean over prompts of each prompt's R² (the one tested); R2 pool: pooled over tokens;")
    lines.append(f"R2-top{k}: pooled without the {k} largest-variance dimensions; R2 stdz: pooled with every "
                 "dimension divided by its std")
    return "\n".join(lines)
