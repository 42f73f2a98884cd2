"""Targeted training: an adapter on exactly the selected decoder layers, with a loss that balances
paraphrase consistency and answer accuracy.

Loss for a batch of pairs (question q, paraphrase p, same image), with the two-way yes/no
distributions π = softmax([yes score, no score]) at the answer position:

    L = ce_weight · ½ (CE(π_q, y_q) + CE(π_p, y_p)) + consistency_weight · C(π_q, π̃_p)

where π̃_p is π_p with yes and no swapped for a negated paraphrase (so agreement means the same
thing), and C is one of

- ``teacher_kl``: KL(sg(π_q) ‖ π̃_p), sg = stop-gradient: the paraphrase's answer is pulled toward
  the original question's, which itself moves only through the cross-entropy
- ``sym_kl``: KL(π_q ‖ π̃_p) + KL(π̃_p ‖ π_q)
- ``js``: ½ KL(π_q ‖ m) + ½ KL(π̃_p ‖ m), m = ½ (π_q + π̃_p)
- ``margin_mse``: (m_q − s·m_p)², m the margin, s = −1 for a negated paraphrase.
- ``activation`` (activation consistency training, ACT): at each layer l of ``activation_layers``
  (default: the adapted layers), with h the residual after layer l at the answer position,
  ‖h_p − sg(h_q)‖² / ‖sg(h_q)‖² (``activation_norm``; else the mean squared difference per
  dimension), averaged over those layers and the pairs whose paraphrase is not negated (a negated
  paraphrase should not share the original's residual). The flip is pulled toward agreement where
  the attribution says it enters, not only at the output.

Both phrasings of a pair run in one batched forward. A collapse guard watches the held-out yes-rate
and accuracy. Checkpoints (adapter weights, optimiser state, RNG state) are written atomically, so
``resume=True`` after an interruption reaches the same result as an uninterrupted run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from mechmed.config import TrainConfig
from mechmed.errors import MechmedError

log = logging.getLogger(__name__)


@dataclass
class LossParts:
    total: object
    ce: object
    consistency: object


def activation_consistency(resid_q: dict, resid_p: dict, negated, normalise: bool = True):
    """The ``activation`` term: mean over layers (``resid_*``: layer -> [B, d_model] residuals at the
    answer position) and non-negated pairs of ‖h_p − sg(h_q)‖² / ‖sg(h_q)‖² (``normalise``), or of
    the mean squared difference per dimension."""
    import torch

    keep = ~negated
    terms = []
    for layer in resid_q:
        hq, hp = resid_q[layer].detach().float()[keep], resid_p[layer].float()[keep]
        sq = ((hp - hq) ** 2).sum(-1)
        terms.append(sq / (hq ** 2).sum(-1).clamp_min(1e-12) if normalise else sq / hq.shape[-1])
    if not terms or not keep.any():  # every pair negated: no term, but a graph for backward
        return sum(h.sum() for h in resid_p.values()) * 0.0 if resid_p else torch.zeros(())
    return torch.stack(terms).mean()


def pair_loss(scores_q, scores_p, yes_q, yes_p, negated, cfg: TrainConfig, resid: tuple | None = None) -> LossParts:
    """The loss above, from [B, 2] yes/no scores of both phrasings and bool labels; ``resid``
    (``consistency: activation``) is (resid_q, resid_p), layer -> [B, d_model] at the answer position."""
    import torch
    import torch.nn.functional as F

    logp_q = torch.log_softmax(scores_q, -1)
    logp_p = torch.log_softmax(scores_p, -1)
    tq = (~yes_q).long()  # index 0 = yes, 1 = no
    tp = (~yes_p).long()
    ce = 0.5 * (F.nll_loss(logp_q, tq) + F.nll_loss(logp_p, tp))
    aligned_p = torch.where(negated[:, None], logp_p.flip(-1), logp_p)
    if cfg.consistency == "teacher_kl":
        teacher = logp_q.detach()
        cons = (teacher.exp() * (teacher - aligned_p)).sum(-1).mean()
    elif cfg.consistency == "sym_kl":
        pq, pp = logp_q.exp(), aligned_p.exp()
        cons = ((pq * (logp_q - aligned_p)).sum(-1) + (pp * (aligned_p - logp_q)).sum(-1)).mean()
    elif cfg.consistency == "js":
        pq, pp = logp_q.exp(), aligned_p.exp()
        log_m = torch.log(0.5 * (pq + pp))
        cons = 0.5 * ((pq * (logp_q - log_m)).sum(-1) + (pp * (aligned_p - log_m)).sum(-1)).mean()
    elif cfg.consistency == "activation":
        if resid is None:
            raise MechmedError("consistency: activation needs the residuals of both phrasings (resid=)")
        cons = activation_consistency(*resid, negated, normalise=cfg.activation_norm)
    else:
        mq = scores_q[:, 0] - scores_q[:, 1]
        mp = scores_p[:, 0] - scores_p[:, 1]
        sign = torch.where(negated, -1.0, 1.0)
        cons = ((mq - sign * mp) ** 2).mean()
    total = cfg.ce_weight * ce + cfg.consistency_weight * cons
    return LossParts(total, ce, cons)


def apply_adapter(bundle, cfg: TrainConfig):
    """Wrap the bundle's model with the configured adapter on exactly ``cfg.layers``.

    Returns (peft model, names of adapted modules). Raises if the match count is not
    len(layers) × len(target_modules), or if anything outside the decoder layers matched.
    """
    from mechmed.sites import Site

    for layer in cfg.layers:
        Site(layer).check(bundle.n_layers)
    if cfg.method == "spectral_moe":
        from mechmed.spectral import apply_spectral_adapter

        return apply_spectral_adapter(bundle, cfg)
    from peft import LoraConfig, get_peft_model

    from mechmed.models import peft_quietly

    lcfg = LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                      target_modules=list(cfg.target_modules), layers_to_transform=list(cfg.layers),
                      layers_pattern=bundle.family.peft_layers_pattern, bias="none")
    try:
        with peft_quietly():
            model = get_peft_model(bundle.model, lcfg)
    except ValueError as e:
        raise MechmedError(f"config option target_modules {cfg.target_modules}: {str(e).splitlines()[0]}") from None
    names = adapted_modules(model)
    expected = len(cfg.layers) * len(cfg.target_modules)
    layer_prefix = f".{bundle.family.layers}."
    outside = [n for n in names if layer_prefix not in n]
    if outside or len(names) != expected:
        raise MechmedError(
            f"config option target_modules: matched {len(names)} modules, expected {expected} "
            f"({len(cfg.layers)} layers × {len(cfg.target_modules)} modules); "
            f"check the module names (outside the decoder: {outside[:3]})")
    return model, names


def adapted_modules(model) -> list[str]:
    """Names of the modules an adapter wraps (peft tuner layers have a ``base_layer``)."""
    return [n for n, m in model.named_modules() if hasattr(m, "base_layer") and hasattr(m, "lora_A")]


def resolve_pairs(data: str, *, split: str, image_root=None, seed: int = 0, cache_dir=None):
    """A source's name (``demo``) -> its training (``split="train"``) or evaluation pairs; anything
    else as :func:`mechmed.consistency.resolve_data` reads it."""
    from mechmed.consistency import resolve_data

    return resolve_data(data, image_root=image_root, seed=seed, cache_dir=cache_dir,
                        split="train" if split == "train" else "eval")


class _Images:
    """Images loaded once, keyed by path."""

    def __init__(self):
        self._cache = {}

    def __call__(self, path):
        from mechmed.data.images import load_image

        if path not in self._cache:
            self._cache[path] = load_image(path)
        return self._cache[path]


class PairScores(NamedTuple):
    """What :func:`_batch_scores` returns for B pairs."""

    q: object
    """[B, 2] yes/no scores of the questions."""
    p: object
    """[B, 2] yes/no scores of the paraphrases."""
    resid: tuple | None = None
    """(questions', paraphrases') layer -> [B, d_model] residuals at the answer position, when asked."""


def _batch_scores(model, bundle, batch, images: _Images, layers=()) -> PairScores:
    """One forward over both phrasings of each pair, reading the residual after each of ``layers`` at
    the answer position (the last token: prompts are left-padded) on the way."""
    from mechmed.capture import hooks
    from mechmed.readout import answer_logits, build_inputs
    from mechmed.sites import Site

    questions = [p.question for p in batch] + [p.paraphrase for p in batch]
    imgs = None
    if bundle.multimodal and batch[0].image is not None:
        imgs = [images(p.image) for p in batch] * 2
    inputs = build_inputs(bundle.processor, questions, imgs).to(bundle.device)
    acts: dict = {}

    def keep(site, act):
        acts[site.layer] = act[:, -1]

    with hooks(bundle.model, bundle.family, {Site(layer): keep for layer in layers}):
        scores = answer_logits(model, inputs, bundle.answers)
    n = len(batch)
    resid = ({k: v[:n] for k, v in acts.items()}, {k: v[n:] for k, v in acts.items()}) if layers else None
    return PairScores(scores[:n], scores[n:], resid)


def guard_check(bundle, model, pairs, images: _Images, cfg: TrainConfig, batch_size: int = 64) -> dict:
    """Held-out yes-rate and accuracy (both phrasings); collapse if the yes-rate leaves
    [collapse_low, collapse_high] or accuracy is no better than always giving the majority answer."""
    import torch

    yes, correct, labels = [], [], []
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for i in range(0, len(pairs), batch_size):
            chunk = pairs[i:i + batch_size]
            sq, sp, _ = _batch_scores(model, bundle, chunk, images)
            for s, lab in ((sq, [p.answer == "yes" for p in chunk]),
                           (sp, [p.expected_paraphrase == "yes" for p in chunk])):
                pred = (s[:, 0] > s[:, 1]).cpu().numpy()
                lab = np.array(lab)
                yes.append(pred)
                correct.append(pred == lab)
                labels.append(lab)
    model.train(was_training)
    yes_rate = float(np.concatenate(yes).mean())
    acc = float(np.concatenate(correct).mean())
    label_rate = float(np.concatenate(labels).mean())
    reasons = collapse_reasons(yes_rate, acc, label_rate, cfg.collapse_low, cfg.collapse_high)
    return {"yes_rate": yes_rate, "accuracy": acc, "collapsed": bool(reasons), "reason": "; ".join(reasons)}


def collapse_reasons(yes_rate: float, accuracy: float, label_yes_rate: float, low: float, high: float) -> list[str]:
    """Why answers count as collapsed (none: not collapsed): a held-out yes-rate outside [low, high],
    or accuracy no better than always giving the majority answer (+0.01)."""
    majority = max(label_yes_rate, 1 - label_yes_rate)
    reasons = []
    if not low <= yes_rate <= high:
        reasons.append(f"held-out yes-rate {yes_rate:.2f} outside [{low}, {high}]")
    if accuracy <= majority + 0.01:
        reasons.append(f"held-out accuracy {accuracy:.2f} no better than the majority answer ({majority:.2f})")
    return reasons


# ---------------------------------------------------------------- checkpoints

def _trainable(model) -> dict:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def save_checkpoint(path: Path, model, optimizer, step: int, extra: dict) -> None:
    """Adapter weights, optimiser state and RNG state in safetensors + JSON, written atomically."""
    import torch
    from safetensors.torch import save_file

    from mechmed.io import follow_umask

    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    save_file({n: p.detach().cpu().contiguous() for n, p in _trainable(model).items()}, tmp / "weights.safetensors")
    names = {id(p): n for n, p in _trainable(model).items()}
    state_tensors, state_meta = {}, {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            st = optimizer.state.get(p, {})
            for k, v in st.items():
                key = f"{names[id(p)]}::{k}"
                if torch.is_tensor(v):
                    state_tensors[key] = v.detach().cpu().contiguous()
                else:
                    state_meta[key] = v
    state_tensors["__torch_rng__"] = torch.get_rng_state()
    save_file(state_tensors, tmp / "optimizer.safetensors")
    (tmp / "state.json").write_text(json.dumps({"step": step, "optimizer_scalars": state_meta, **extra}))
    follow_umask(tmp)
    if path.exists():
        old = path.with_name(path.name + ".old")
        if old.exists():
            shutil.rmtree(old)
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old)
    else:
        os.replace(tmp, path)


def load_checkpoint(path: Path, model, optimizer) -> dict:
    import torch
    from safetensors.torch import load_file

    weights = load_file(path / "weights.safetensors")
    params = _trainable(model)
    missing = set(params) ^ set(weights)
    if missing:
        raise MechmedError(f"checkpoint {path}: does not match this config's adapter ({sorted(missing)[:2]}); "
                           "resume with the config that wrote it, or start without --resume")
    with torch.no_grad():
        for n, p in params.items():
            p.copy_(weights[n])
    state = json.loads((path / "state.json").read_text())
    opt = load_file(path / "optimizer.safetensors")
    torch.set_rng_state(opt.pop("__torch_rng__"))
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = next(n for n, q in params.items() if q is p)
            st = {}
            for key, v in opt.items():
                pname, _, k = key.partition("::")
                if pname == name:
                    st[k] = v
            for key, v in state["optimizer_scalars"].items():
                pname, _, k = key.partition("::")
                if pname == name:
                    st[k] = v
            if st:
                optimizer.state[p] = st
    return state


# ---------------------------------------------------------------- the run

@dataclass
class TrainResult:
    out: Path
    metrics: dict
    log: list


def lr_factor(schedule: str, step: int, total: int) -> float:
    """The learning rate of optimiser step ``step`` (0-based) of ``total``, as a fraction of the peak:
    ``linear`` falls from 1 to 0 at step ``total`` (transformers' default schedule), ``cosine`` along
    half a cosine, ``constant`` stays 1. A pure function of the step, so a resumed run follows it exactly."""
    t = step / max(1, total)
    if schedule == "linear":
        return 1.0 - t
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * t))
    return 1.0


def _order(n: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(n)


#: Beside a trained adapter: the base model it was trained on (name, GGUF source, prompt format).
BASE_MODEL_FILE = "base_model.json"


def check_launch(cfg: TrainConfig, device: str, resume: bool = False) -> None:
    """What ``accelerate launch`` asks for, checked before any weights load.

    The config's ``bf16`` decides autocast: a different ``--mixed_precision X`` (which sets
    ACCELERATE_MIXED_PRECISION) is refused, not silently overridden; bf16 needs ``bf16: true`` in the
    config, and fp16/fp8 are not supported.

    ``--use_fsdp`` (ACCELERATE_USE_FSDP) shards only on accelerators: on the CPU accelerate would train
    whole copies data parallel instead, so it is refused there. A sharded run writes no resumable
    checkpoint (they hold one process's parameters), so ``--resume`` and spectral experts (saved by
    their own writer) are refused under it."""
    asked = os.environ.get("ACCELERATE_MIXED_PRECISION", "no").strip().lower()
    if asked == "bf16" and not cfg.bf16:
        raise MechmedError("accelerate launch --mixed_precision bf16, but the training config has bf16: false; set "
                           "bf16: true in the config (or pass --bf16), or launch with --mixed_precision no")
    if asked not in ("", "no", "bf16"):
        raise MechmedError(f"accelerate launch --mixed_precision {asked}: mechmed trains in float32 or bf16 autocast "
                           "(config bf16: true); launch with --mixed_precision no or bf16")
    from accelerate.utils import parse_flag_from_env

    if parse_flag_from_env("ACCELERATE_USE_FSDP"):  # accelerate's own reading of the flag
        check_sharded(cfg, device, resume)


def check_sharded(cfg: TrainConfig, device: str, resume: bool) -> None:
    """What a sharded (FSDP) run refuses; :func:`check_launch` before anything loads, and again once
    accelerate has decided it shards."""
    import torch

    if torch.device(device).type == "cpu":
        raise MechmedError("accelerate launch --use_fsdp with --device cpu: accelerate shards only on GPUs (on the "
                           "CPU it would train whole copies data parallel); launch with --multi_gpu for data "
                           "parallel on the CPU, or train on GPUs")
    if resume:
        raise MechmedError("--resume under FSDP: sharded runs write no resumable checkpoint; start again, or "
                           "train data parallel (accelerate launch --multi_gpu) to resume")
    if cfg.method == "spectral_moe":
        raise MechmedError("method spectral_moe under FSDP: not supported; train it data parallel (accelerate "
                           "launch --multi_gpu) or on one GPU")


def check_against_model(cfg: TrainConfig, skeleton_cache: dict | None = None) -> None:
    """Check ``cfg``'s layers against the model's config and its target modules against the model's
    module tree (built on the meta device: no weights are read). ``skeleton_cache`` reuses one tree
    across the configs of a grid."""
    from types import SimpleNamespace

    from mechmed.models import model_config, skeleton
    from mechmed.readout import check_template
    from mechmed.spectral import target_names

    if cfg.prompt_template is not None:
        check_template(cfg.prompt_template, "config option prompt_template:")

    _, model_cfg, family, _ = model_config(cfg.model.name, seed=cfg.seed, **cfg.model.options(placement=False))
    n_layers = family.n_layers(model_cfg)
    for option, layers in (("layers", cfg.layers), ("activation_layers", cfg.activation_layers or [])):
        outside = [layer for layer in layers if not 0 <= layer < n_layers]
        if outside:
            raise MechmedError(f"config option {option}: layer {outside[0]} is outside the model's {n_layers} "
                               f"decoder layers (0-{n_layers - 1}); choose layers inside it")
    cache = skeleton_cache if skeleton_cache is not None else {}
    key = (cfg.model, cfg.seed)
    if key not in cache:
        cache[key] = skeleton(model_cfg, family)
    target_names(SimpleNamespace(family=family, model=cache[key]), cfg.layers, cfg.target_modules)


def train(cfg: TrainConfig, out: str | os.PathLike, *, resume: bool = False, device: str = "cpu",
          evaluate_before_after: bool = True, evaluate_before: bool = True, stop_after: int | None = None,
          progress: bool | str = False, png: bool = True, dtype: str | None = None) -> TrainResult:
    """Train the configured adapter and write the run directory (see docs/training.md).

    ``device`` is a torch device or ``auto``; ``dtype`` the base weights' dtype (default float32 on
    the CPU, bfloat16 on CUDA; the adapter trains in float32 either way).

    ``evaluate_before=False`` skips the base model's evaluation (the ablation grid evaluates the
    base once for all its arms); the adapted model is still evaluated when ``evaluate_before_after``.

    ``png=False`` writes the training-curve figure as HTML only (the ablation grid does: its report
    draws every arm's curves again, and a browser per worker process costs seconds).

    ``stop_after`` ends the run after that many optimiser steps without finishing it (as an
    interruption would; used to test resuming).
    """
    import torch
    from accelerate import Accelerator
    from accelerate.utils import DistributedType

    from mechmed.consistency import compare_runs
    from mechmed.io import ensure_dir, follow_umask, read_jsonl, write_json, write_text
    from mechmed.models import load_model
    from mechmed.progress import progress_bar
    from mechmed.readout import warn_text_only
    from mechmed.runtime import check_device, determinism_state, versions

    device = check_device(device)
    out = Path(out)
    check_against_model(cfg)  # before any data, weights or evaluation
    check_launch(cfg, device, resume)
    train_pairs = resolve_pairs(cfg.train_data, split="train", image_root=cfg.image_root, seed=cfg.seed)
    eval_pairs = resolve_pairs(cfg.eval_data, split="eval", image_root=cfg.image_root, seed=cfg.seed)
    extra_pairs = {name: resolve_pairs(data, split="eval", image_root=cfg.image_root, seed=cfg.seed)
                   for name, data in cfg.extra_eval.items()}
    ckpt = out / "checkpoint"
    if resume and not ckpt.exists() and ckpt.with_name("checkpoint.old").is_dir():
        os.replace(ckpt.with_name("checkpoint.old"), ckpt)  # killed between the two renames of a save
    if not resume and (out / "metrics.json").exists():
        raise MechmedError(f"--out {out}: holds a finished run; choose another directory or delete it")
    if resume and not ckpt.exists():
        log.warning("no checkpoint in %s: starting from the beginning", out)
    ensure_dir(out)

    # one process on a named GPU (cuda:1) stays there; accelerate would place it on its own cuda:0
    pinned = device.startswith("cuda:") and int(os.environ.get("WORLD_SIZE", "1")) == 1
    accelerator = Accelerator(mixed_precision="bf16" if cfg.bf16 else "no", cpu=device == "cpu",
                              device_placement=not pinned)
    per_step = cfg.batch_size * cfg.grad_accum * accelerator.num_processes
    if per_step > len(train_pairs):  # an optimiser step would run on empty micro-batches
        raise MechmedError(f"config options batch_size × grad_accum{' × processes' if accelerator.num_processes > 1 else ''}"
                           f" = {per_step} pairs per optimiser step, but train_data has {len(train_pairs)}; lower "
                           "batch_size or grad_accum")
    torch.manual_seed(cfg.seed)
    placed = device if pinned or device == "cpu" else str(accelerator.device)
    bundle = load_model(cfg.model, device=placed, dtype=dtype, answer_words=tuple(cfg.answer_words),
                        seed=cfg.seed, prompt_template=cfg.prompt_template)
    warn_text_only(bundle, train_pairs)
    images = _Images()
    rng = np.random.default_rng(cfg.seed)
    guard_pairs = [eval_pairs[i] for i in sorted(rng.permutation(len(eval_pairs))[:cfg.guard_pairs])]

    before = None
    if evaluate_before_after and evaluate_before and accelerator.is_main_process:
        before = evaluate_sets(bundle, eval_pairs, extra_pairs, out / "before", seed=cfg.seed, progress=progress)

    for p in bundle.model.parameters():
        p.requires_grad_(False)
    torch.manual_seed(cfg.seed)
    model, adapted = apply_adapter(bundle, cfg)
    spectral = cfg.method == "spectral_moe"
    init_deviation = None
    if spectral:
        from mechmed.spectral import balance_loss, init_margin_deviation

        init_deviation = init_margin_deviation(model, bundle, guard_pairs)
    if cfg.gradient_checkpointing:
        # non-reentrant: the activation term's hooks must see tensors that carry grad
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sharded = accelerator.distributed_type == DistributedType.FSDP
    if sharded:
        check_sharded(cfg, device, resume)  # as check_launch did, should accelerate shard on another signal
    model, optimizer = accelerator.prepare(model, optimizer)

    steps_per_epoch = max(1, len(train_pairs) // per_step)
    total = math.ceil(cfg.epochs * steps_per_epoch)
    if cfg.max_steps:
        total = min(total, cfg.max_steps)

    step, history = 0, []
    log_path = out / "train_log.jsonl"
    if resume and ckpt.exists():
        state = load_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer)
        if cfg.lr_schedule != "constant" and state.get("total", total) != total:  # the schedule follows total
            raise MechmedError(f"--resume {out}: the checkpoint was written for a run of {state['total']} steps, "
                               f"this config makes {total} (lr_schedule {cfg.lr_schedule} depends on it); resume "
                               "with the config that wrote it")
        step = state["step"]
        history = read_jsonl(log_path, "training log") if log_path.exists() else []
        history = [h for h in history if h["step"] <= step]
        log.info("resumed at step %d", step)
    collapse = next((h for h in history if h.get("collapsed")), None)

    act_layers = cfg.act_layers if cfg.consistency == "activation" else ()
    model.train()
    t0 = time.perf_counter()
    first = step
    for step in progress_bar(range(first, total), desc=(progress if isinstance(progress, str) else "training")
                             if progress else None, total=total - first):
        epoch, within = divmod(step, steps_per_epoch)
        order = _order(len(train_pairs), cfg.seed, epoch)
        sums = {"loss": 0.0, "ce": 0.0, "consistency": 0.0, **({"balance": 0.0} if spectral else {})}
        for micro in range(cfg.grad_accum):
            start = (within * cfg.grad_accum + micro) * cfg.batch_size * accelerator.num_processes
            start += accelerator.process_index * cfg.batch_size
            batch = [train_pairs[i] for i in order[start:start + cfg.batch_size]]
            with accelerator.autocast():
                sq, sp, resid = _batch_scores(model, bundle, batch, images, act_layers)
                yes_q = torch.tensor([p.answer == "yes" for p in batch], device=sq.device)
                yes_p = torch.tensor([p.expected_paraphrase == "yes" for p in batch], device=sq.device)
                neg = torch.tensor([p.negated for p in batch], device=sq.device)
                parts = pair_loss(sq.float(), sp.float(), yes_q, yes_p, neg, cfg, resid)
                if spectral:
                    balance = balance_loss(model)
                    parts.total = parts.total + cfg.spectral.balance_coef * balance
                    sums["balance"] += float(balance.detach()) / cfg.grad_accum
            if not torch.isfinite(parts.total):
                raise MechmedError(f"training loss is {parts.total.item()} at step {step + 1}: lower lr "
                                   f"(now {cfg.lr}) or turn off bf16")
            accelerator.backward(parts.total / cfg.grad_accum)
            for k, v in (("loss", parts.total), ("ce", parts.ce), ("consistency", parts.consistency)):
                sums[k] += float(v.detach()) / cfg.grad_accum
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * lr_factor(cfg.lr_schedule, step, total)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        record = {"step": step + 1, "epoch": epoch, **sums}
        done = step + 1
        if cfg.eval_every and done % cfg.eval_every == 0 or done == total:
            g = guard_check(bundle, model, guard_pairs, images, cfg)
            record.update({"guard_" + k: v for k, v in g.items() if k != "collapsed"}, collapsed=g["collapsed"])
            if g["collapsed"] and collapse is None:
                collapse = record
                log.warning("collapse at step %d: %s", done, g["reason"])
        history.append(record)
        if accelerator.is_main_process and (done % cfg.checkpoint_every == 0 or done == total):
            write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))
            if not sharded:  # a sharded model's parameters are not all on this process
                save_checkpoint(ckpt, accelerator.unwrap_model(model), optimizer, done, {"total": total})
        if collapse is not None and cfg.stop_on_collapse:
            break
        if stop_after is not None and done >= stop_after:
            return TrainResult(out, {"interrupted_at": done}, history)
    train_seconds = time.perf_counter() - t0

    # under FSDP every process takes part in gathering the full weights (to the main process's CPU)
    gathered = accelerator.get_state_dict(model) if sharded else None
    unwrapped = accelerator.unwrap_model(model)
    unwrapped.eval()
    metrics: dict = {
        "steps": history[-1]["step"] if history else 0, "total_steps": total, "train_seconds": train_seconds,
        "n_train_pairs": len(train_pairs), "n_eval_pairs": len(eval_pairs), "trainable_parameters": n_trainable,
        "adapted_modules": adapted, "n_adapted_modules": len(adapted), "layers": cfg.layers, "method": cfg.method,
        "collapsed": collapse is not None,
        "collapse": None if collapse is None else {"step": collapse["step"], "reason": collapse.get("guard_reason")},
        "seed": cfg.seed, "versions": versions(),
        "determinism": determinism_state(), "device": str(bundle.device), "dtype": str(bundle.model.dtype),
        "model_provenance": bundle.provenance,
    }
    if init_deviation is not None:
        metrics["init_margin_deviation"] = init_deviation
    if accelerator.is_main_process:
        adapter_dir = out / "adapter"
        tmp = out / "adapter.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        unwrapped.save_pretrained(tmp, **({"state_dict": gathered} if sharded else {}))
        write_json(tmp / BASE_MODEL_FILE, bundle.provenance)  # which weights (a GGUF file's hash) and prompts
        follow_umask(tmp)  # safetensors writes owner-only files
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        os.replace(tmp, adapter_dir)
        if spectral:
            metrics["expert_utilisation"] = _utilisation(unwrapped, bundle, guard_pairs, out, png=png)["layers"]
        if evaluate_before_after:
            if sharded:  # the saved adapter on a fresh copy of the base model, on this process alone
                from mechmed.models import attach_adapter

                del model, unwrapped, gathered
                fresh = load_model(cfg.model, device=placed, dtype=dtype, answer_words=tuple(cfg.answer_words),
                                   seed=cfg.seed, prompt_template=cfg.prompt_template)
                adapted_bundle = attach_adapter(fresh, adapter_dir)
            else:
                adapted_bundle = bundle.__class__(unwrapped, bundle.processor, bundle.family, bundle.answers,
                                                  bundle.name + "+adapter")
            after = evaluate_sets(adapted_bundle, eval_pairs, extra_pairs, out / "after", seed=cfg.seed,
                                  progress=progress)
            metrics["after"] = after["main"]
            metrics["after_sets"] = {k: v for k, v in after.items() if k != "main"}
            if before is not None:
                metrics["before"] = before["main"]
                metrics["before_sets"] = {k: v for k, v in before.items() if k != "main"}
                metrics["comparison"] = compare_runs(out / "before", out / "after")
                metrics["comparison_sets"] = {k: compare_runs(out / "before" / k, out / "after" / k)
                                              for k in extra_pairs}
        resolved = cfg.to_dict()
        resolved["versions"] = metrics["versions"]
        import yaml

        write_text(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
        write_text(log_path, "".join(json.dumps(h) + "\n" for h in history))
        _curve_figure(history, out, png=png)
        write_json(out / "metrics.json", metrics)  # last: its presence marks the run finished
    return TrainResult(out, metrics, history)


def evaluate_sets(bundle, main, extra: dict, out: Path, *, seed: int = 0, progress: bool = False,
                  edit=None) -> dict:
    """Evaluate the main pair set into ``out`` and each named extra set into ``out/<name>`` (``metrics.json``
    and ``pairs.jsonl`` each; the image controls only on the main set, which is written last); returns
    name ("main" for the main set) -> metrics. ``edit``: a training-free fix (:mod:`mechmed.interventions`)
    that computes every margin."""
    from mechmed.consistency import evaluate
    from mechmed.io import ensure_dir, write_json, write_jsonl
    from mechmed.runtime import determinism_state

    out_metrics: dict = {}
    shared: dict = {}  # the sets ask the same questions about the same images: run each once
    for name, pairs in {**extra, "main": main}.items():  # main last: its metrics.json marks the whole as done
        d = ensure_dir(out if name == "main" else out / name)
        ev = evaluate(bundle, pairs, seed=seed, batch_size=64, controls=name == "main", progress=progress,
                      question_margins=None if edit is not None else shared, edit=edit)
        ev.metrics["determinism"] = determinism_state()
        write_jsonl(d / "pairs.jsonl", ev.pairs)
        write_json(d / "metrics.json", ev.metrics)
        out_metrics[name] = ev.metrics
    return out_metrics


def _utilisation(model, bundle, pairs, out: Path, png: bool = True) -> dict:
    """``expert_utilisation.json`` and the layer × expert heatmap (``expert_utilisation.html``/png) in ``out``."""
    from mechmed.figures import expert_heatmap, save_figure
    from mechmed.io import write_json
    from mechmed.spectral import expert_utilisation

    stats = expert_utilisation(model, bundle, pairs)
    write_json(out / "expert_utilisation.json", stats)
    save_figure(expert_heatmap(stats), out / "expert_utilisation", png=png)
    return stats


def _curve_figure(history: list, out: Path, png: bool = True) -> None:
    from mechmed.figures import save_figure, training_curves

    save_figure(training_curves(history), out / "training_curves", png=png)
