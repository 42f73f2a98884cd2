"""Training-free fixes for paraphrase flips, placed where the attribution found them.

Each fix is a :class:`PromptEdit`: it computes the yes/no margins of a batch of prompts in its own
way, and :func:`mechmed.consistency.evaluate` (``edit=``) runs it in place of a plain forward, so a
fix gets exactly the metrics, controls and tests a trained adapter gets. The question prompts come
with ``role="question"`` (``rows``: their (image, question) keys), the paraphrases with
``role="paraphrase"`` (``rows``: their pairs).

- :class:`Steering` (``steer``): v = mean over training pairs (negated ones left out) of
  h_q − h_p, h the residual after layer L at the answer position (L the last selected layer);
  ``scale``·v is added at that position and layer to every *paraphrase* prompt (the rewording of
  a canonical question; the canonical prompt is run as it is).
- :class:`Clamp` (``clamp``): the top attributed flip features (SAE latents at the selected layers,
  ranked by mean |attribution| over the flipped pairs, :func:`top_features`) are set, at the
  answer position, to their value on the pair's original question (``to="original"``:
  paraphrase prompts only) or to zero (``to="zero"``: every prompt, as PSF-Med clamps), with the
  SAE's error term kept: x ← x + Σᵢ (targetᵢ − fᵢ(x))·W_dec[i].
- :class:`Ensemble` (``ensemble``): each prompt is answered by the mean margin over itself and up
  to k − 1 other phrasings of the same question from the evaluated set (an oracle paraphraser:
  the set's own rewordings). Within a pair the two sides share no phrasing: the other paraphrases
  of the question (the pair's own left out) are shuffled with a seed fixed by the pair and dealt
  alternately to the question and to the paraphrase, up to k − 1 each; so the question's answer
  within a pair (:meth:`Ensemble.pair_question_margins`) never averages in its own pair's
  paraphrase. The canonical question alone (accuracy, the image controls) averages over k − 1 of
  all its paraphrases. Margins of a negated phrasing enter with their sign turned, so every term
  speaks of the same answer.

Clamp (to the original) and steer edit the rewording toward the original; a pair whose paraphrase
inverts the answer (negated) is left unedited, as the steering fit and the activation loss leave it out.
"""

from __future__ import annotations

import csv
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mechmed.capture import hooks
from mechmed.errors import MechmedError
from mechmed.readout import margins
from mechmed.sites import Site

#: Where a clamped feature goes: its value on the pair's original question, or zero.
CLAMP_TO = ("original", "zero")


class PromptEdit:
    """A way to compute margins (see the module doc); the base class runs the plain model."""

    name = "plain"

    def prepare(self, pairs: Sequence) -> None:
        """Called by :func:`mechmed.consistency.evaluate` with the pairs it evaluates, before any margin."""

    def margins(self, bundle, texts, images, *, role: str, rows: Sequence, batch_size: int = 16,
                progress: str | None = None):
        return margins(bundle, texts, images, batch_size=batch_size, progress=progress)

    def pair_question_margins(self, bundle, pairs, images, *, batch_size: int = 16):
        """Per pair, the question's margin where it depends on the pair (None: the question's own)."""
        return None

    def describe(self) -> dict:
        return {"kind": self.name}


def _last_position_edit(fn):
    """A hook function that edits the activation at the answer position (the last: left-padded)."""

    def hook(site, act):
        new = act.clone()
        new[:, -1] = fn(site, act[:, -1])
        return new

    return hook


def _batched_margins(bundle, texts, images, batch_size, progress, fns_for_batch):
    """Margins batch by batch, with ``fns_for_batch(start, stop)`` -> {Site: hook fn} active."""
    import torch

    from mechmed.progress import progress_bar

    texts = list(texts)
    out = []
    starts = range(0, len(texts), batch_size)
    for start in progress_bar(starts, desc=progress, total=len(starts)):
        stop = min(start + batch_size, len(texts))
        with hooks(bundle.model, bundle.family, fns_for_batch(start, stop)):
            out.append(margins(bundle, texts[start:stop], None if images is None else list(images[start:stop]),
                               batch_size=stop - start))
    return torch.cat(out) if out else torch.zeros(0)


# ---------------------------------------------------------------------------- steering


def _edited(rows) -> object:
    """1.0 for each paraphrase row that an edit toward the original applies to, 0.0 for a negated one."""
    import torch

    return torch.tensor([0.0 if p.negated else 1.0 for p in rows])


def answer_residuals(bundle, texts, images, layers: Sequence[int], *, batch_size: int = 16) -> dict:
    """Residuals after each of ``layers`` at the answer position (:func:`mechmed.capture.capture`,
    ``positions="last"``): layer -> [n, d_model] float32 (CPU)."""
    import torch

    from mechmed.capture import capture
    from mechmed.readout import build_inputs

    texts = list(texts)
    out: dict = {layer: [] for layer in layers}
    for start in range(0, len(texts), batch_size):
        sl = slice(start, start + batch_size)
        inputs = build_inputs(bundle.processor, texts[sl], None if images is None else list(images[sl]))
        acts = capture(bundle, inputs.to(bundle.device), [Site(layer) for layer in layers], positions="last").acts
        for layer in layers:
            out[layer].append(acts[Site(layer)][:, -1].float().cpu())
    return {layer: torch.cat(v) for layer, v in out.items()}


def _pair_images(bundle, pairs):
    from mechmed.readout import pair_images

    return pair_images(pairs) if bundle.multimodal else None


@dataclass
class Steering(PromptEdit):
    """Add ``scale``·``vector`` after ``layer`` at the answer position of every paraphrase prompt."""

    vector: object
    layer: int
    scale: float = 1.0
    n_fit: int = 0
    name = "steer"

    def margins(self, bundle, texts, images, *, role, rows, batch_size=16, progress=None):
        if role != "paraphrase":
            return super().margins(bundle, texts, images, role=role, rows=rows, batch_size=batch_size,
                                   progress=progress)
        v = self.scale * self.vector
        keep = _edited(rows)

        def fns(a, b):
            def add(site, x):
                return x + keep[a:b, None].to(x.device, x.dtype) * v.to(x.device, x.dtype)

            return {Site(self.layer): _last_position_edit(add)}

        return _batched_margins(bundle, texts, images, batch_size, progress, fns)

    def describe(self) -> dict:
        return {"kind": self.name, "layer": self.layer, "scale": self.scale, "norm": float(self.vector.norm()),
                "n_fit_pairs": self.n_fit}


def fit_steering(bundle, train_pairs: Sequence, layer: int, *, scale: float = 1.0, batch_size: int = 16) -> Steering:
    """The steering vector from training pairs only: mean of h_q − h_p after ``layer`` at the answer
    position over the pairs whose paraphrase is not negated."""
    pairs = [p for p in train_pairs if not p.negated]
    if not pairs:
        raise MechmedError("steer: the training pairs have no meaning-preserving pair to fit the vector on")
    Site(layer).check(bundle.n_layers)
    imgs = _pair_images(bundle, pairs)
    hq = answer_residuals(bundle, [p.question for p in pairs], imgs, [layer], batch_size=batch_size)[layer]
    hp = answer_residuals(bundle, [p.paraphrase for p in pairs], imgs, [layer], batch_size=batch_size)[layer]
    return Steering((hq - hp).mean(0), layer, scale, len(pairs))


# ---------------------------------------------------------------------------- SAE feature clamping


def top_features(features_csv: str | Path, layers: Sequence[int], n: int) -> dict[int, list[int]]:
    """The ``n`` features with the largest mean |attribution| (``mean_abs_attr`` of an attribution's
    ``features.csv``) among ``layers``: layer -> feature indices."""
    path = Path(features_csv)
    if path.is_dir():
        path = path / "features.csv"
    if not path.is_file():
        raise MechmedError(f"clamp: {path}: no such file; give the directory mechmed attribute wrote "
                           "(it holds features.csv), or run mechmed attribute with --saes")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    need = {"layer", "feature", "mean_abs_attr"}
    if rows and not need <= set(rows[0]):
        raise MechmedError(f"clamp: {path}: needs columns {sorted(need)}; it has {sorted(rows[0])}")
    wanted = {int(x) for x in layers}
    ranked = sorted((r for r in rows if int(r["layer"]) in wanted), key=lambda r: -float(r["mean_abs_attr"]))
    if not ranked:
        raise MechmedError(f"clamp: {path} ranks no feature in layers {sorted(wanted)}; attribute with SAEs at "
                           "those layers")
    out: dict[int, list[int]] = {}
    for r in ranked[:n]:
        out.setdefault(int(r["layer"]), []).append(int(r["feature"]))
    return dict(sorted(out.items()))


@dataclass
class Clamp(PromptEdit):
    """Clamp ``features`` (layer -> indices) of ``saes`` (layer -> SAE) at the answer position."""

    saes: dict
    features: dict
    to: str = "original"
    name = "clamp"

    def __post_init__(self):
        if self.to not in CLAMP_TO:
            raise MechmedError(f"clamp_to {self.to!r}: use one of {', '.join(CLAMP_TO)}")
        missing = [layer for layer in self.features if layer not in self.saes]
        if missing:
            raise MechmedError(f"clamp: no SAE for layer {missing[0]}; give SAEs covering the clamped layers")

    def _delta(self, layer, x, target, keep=None):
        """``x`` plus decode(f') − decode(f), f = encode(x) and f' = f with the clamped features of
        ``layer`` set to ``target`` ([B, k]); the SAE's error term x − decode(f) stays. Rows with
        ``keep`` 0 are left as they are."""
        import torch

        sae = self.saes[layer]
        idx = list(self.features[layer])
        with torch.no_grad():
            f = sae.encode(x.to(sae.W_dec.device, sae.W_dec.dtype))
            clamped = f.clone()
            clamped[:, idx] = target.to(f.device, f.dtype)
            d = sae.decode(clamped) - sae.decode(f)
            if keep is not None:
                d = d * keep[:, None].to(d.device, d.dtype)
        return x + d.to(x.device, x.dtype)

    def _question_features(self, bundle, pairs, images, batch_size: int) -> dict:
        """Per pair, the clamped features' values on its original question (layer -> [n, k])."""
        import torch

        res = answer_residuals(bundle, [p.question for p in pairs], images, list(self.features),
                               batch_size=batch_size)
        out = {}
        for layer, h in res.items():
            sae = self.saes[layer]
            with torch.no_grad():
                f = sae.encode(h.to(sae.W_dec.device, sae.W_dec.dtype))
            out[layer] = f[:, self.features[layer]].cpu()
        return out

    def margins(self, bundle, texts, images, *, role, rows, batch_size=16, progress=None):
        import torch

        if self.to == "zero":
            def zero(site, x):
                return self._delta(site.layer, x, torch.zeros(x.shape[0], len(self.features[site.layer])))

            return _batched_margins(bundle, texts, images, batch_size, progress,
                                    lambda a, b: {Site(layer): _last_position_edit(zero) for layer in self.features})
        if role != "paraphrase":
            return super().margins(bundle, texts, images, role=role, rows=rows, batch_size=batch_size,
                                   progress=progress)
        target = self._question_features(bundle, rows, images, batch_size)
        keep = _edited(rows)

        def fns(a, b):
            def to_original(site, x):
                return self._delta(site.layer, x, target[site.layer][a:b], keep[a:b])

            return {Site(layer): _last_position_edit(to_original) for layer in self.features}

        return _batched_margins(bundle, texts, images, batch_size, progress, fns)

    def describe(self) -> dict:
        return {"kind": self.name, "to": self.to, "features": {str(k): v for k, v in self.features.items()}}


# ---------------------------------------------------------------------------- prompt ensembling


def _rng(key: str) -> np.random.Generator:
    """A generator seeded by ``key`` (the same draws in every run and process)."""
    return np.random.default_rng(int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little"))


def _where(pair) -> str:
    """What names a pair's question in a draw's key independently of where the data lives: its
    ``question_id``, else its image's file name (an absolute path would make the draws differ between
    two copies of one data set)."""
    return pair.question_id or ("" if pair.image is None else Path(pair.image).name)


def _draw(pool: list, k: int, key: str) -> list:
    """``k`` items of ``pool`` drawn without replacement with a seed fixed by ``key`` (all if fewer)."""
    if len(pool) <= k:
        return list(pool)
    return [pool[i] for i in sorted(_rng(key).choice(len(pool), k, replace=False))]


@dataclass
class Ensemble(PromptEdit):
    """Answer each prompt by the mean margin over it and up to ``k`` − 1 other phrasings of its question."""

    k: int = 3
    name = "ensemble"
    _groups: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if not isinstance(self.k, int) or self.k < 2:
            raise MechmedError(f"ensemble_k {self.k!r}: give at least 2 phrasings to average over")

    def prepare(self, pairs):
        self._groups = {}
        for p in pairs:
            self._groups.setdefault((p.image, p.question), []).append(p)

    @staticmethod
    def _aligned(p, own: float = 1.0) -> tuple[str, float]:
        """A paraphrase and the sign that turns its margin into ``own``'s polarity."""
        return p.paraphrase, own * (-1.0 if p.negated else 1.0)

    def _deal(self, pair) -> tuple[list, list]:
        """The pair's other paraphrases, shuffled with a seed fixed by the pair and dealt alternately
        to its question and to its paraphrase, up to k − 1 each: the two sides share none."""
        others = [p for p in self._groups[(pair.image, pair.question)] if p.id != pair.id]
        order = [others[i] for i in _rng(f"deal|{pair.id}").permutation(len(others))]
        q_side, p_side = order[0::2][:self.k - 1], order[1::2][:self.k - 1]
        return q_side, p_side

    def _mean_margins(self, bundle, plans, images, batch_size, progress):
        """For each plan (a list of (text, sign)), the mean of sign × margin, with that plan's image."""
        import torch

        flat_t = [t for plan in plans for t, _ in plan]
        flat_i = None if images is None else [images[i] for i, plan in enumerate(plans) for _ in plan]
        m = margins(bundle, flat_t, flat_i, batch_size=batch_size, progress=progress).numpy()
        out, j = [], 0
        for plan in plans:
            signs = np.array([s for _, s in plan])
            out.append(float((signs * m[j:j + len(plan)]).mean()))
            j += len(plan)
        return torch.tensor(out, dtype=torch.float32)

    def margins(self, bundle, texts, images, *, role, rows, batch_size=16, progress=None):
        if not self._groups:
            raise MechmedError("ensemble: call prepare(pairs) first (mechmed.consistency.evaluate does)")
        plans = []
        for text, row in zip(texts, rows):
            if role == "question":  # the canonical question alone: k − 1 of all its paraphrases
                group = self._groups[row]
                pool = [self._aligned(p) for p in group]
                plans.append([(text, 1.0), *_draw(pool, self.k - 1, f"q|{row[1]}|{_where(group[0])}")])
            else:
                own = -1.0 if row.negated else 1.0
                plans.append([(text, 1.0), *(self._aligned(p, own) for p in self._deal(row)[1])])
        return self._mean_margins(bundle, plans, images, batch_size, progress)

    def pair_question_margins(self, bundle, pairs, images, *, batch_size=16):
        plans = [[(p.question, 1.0), *(self._aligned(o) for o in self._deal(p)[0])] for p in pairs]
        return self._mean_margins(bundle, plans, images, batch_size, None).numpy()

    def describe(self) -> dict:
        return {"kind": self.name, "k": self.k}
