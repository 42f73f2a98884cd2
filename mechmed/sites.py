"""Sites: where in the network an activation lives.

A :class:`Site` is a decoder layer index plus a kind. It is the shared currency of capture,
SAE checks, attribution and training. Turning a Site into a module path is the job of the
architecture maps in :mod:`mechmed.families`, and nothing else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from mechmed.errors import MechmedError

SITE_KINDS = ("resid_post", "attn_out", "mlp_out")
_HOOK_RE = re.compile(r"^blocks\.(\d+)\.hook_(\w+)$")


@dataclass(frozen=True, order=True)
class Site:
    """A decoder layer's residual stream after the block (``resid_post``), or the attention /
    MLP output that the block adds to it (``attn_out`` / ``mlp_out``)."""

    layer: int
    kind: str = "resid_post"

    def __post_init__(self) -> None:
        if not isinstance(self.layer, int) or self.layer < 0:
            raise MechmedError(f"site layer {self.layer!r}: must be a non-negative integer")
        if self.kind not in SITE_KINDS:
            raise MechmedError(f"site kind {self.kind!r}: must be one of {', '.join(SITE_KINDS)}")

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook name, e.g. ``blocks.17.hook_resid_post``."""
        return f"blocks.{self.layer}.hook_{self.kind}"

    def __str__(self) -> str:
        return f"{self.kind}:{self.layer}"

    @classmethod
    def parse(cls, text: str | int) -> Site:
        """Parse ``17``, ``resid_post:17`` or ``blocks.17.hook_resid_post``."""
        if isinstance(text, int):
            return cls(text)
        s = str(text).strip()
        m = _HOOK_RE.match(s)
        if m:
            return cls(int(m.group(1)), m.group(2))
        kind, _, layer = s.rpartition(":")
        try:
            return cls(int(layer), kind or "resid_post")
        except ValueError:
            raise MechmedError(
                f"site {text!r}: write a layer number, KIND:LAYER (e.g. resid_post:17) "
                "or a TransformerLens hook name (blocks.17.hook_resid_post)"
            ) from None

    def check(self, n_layers: int) -> Site:
        """Raise if the layer is outside a model with ``n_layers`` decoder layers."""
        if self.layer >= n_layers:
            raise MechmedError(f"layer {self.layer}: out of range; the model has layers 0..{n_layers - 1}")
        return self


def parse_layers(text: str, n_layers: int | None = None) -> list[int]:
    """Parse ``"15-19"``, ``"3,5,7"``, ``"all"`` into a sorted list of layer indices."""
    s = str(text).strip()
    if s == "all":
        if n_layers is None:
            raise MechmedError("layers 'all': the model's layer count is needed")
        return list(range(n_layers))
    out: set[int] = set()
    try:
        for part in s.split(","):
            part = part.strip()
            if "-" in part:
                a, b = part.split("-", 1)
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
                out.update(range(lo, hi + 1))
            elif part:
                out.add(int(part))
    except ValueError:
        raise MechmedError(f"layers {text!r}: write e.g. 15-19, 3,5,7 or all") from None
    if not out:
        raise MechmedError(f"layers {text!r}: empty; write e.g. 15-19, 3,5,7 or all")
    layers = sorted(out)
    if n_layers is not None:
        for layer in layers:
            Site(layer).check(n_layers)
    return layers


def format_layers(layers) -> str:
    """The inverse of :func:`parse_layers`: ``[2, 3, 4]`` → ``"2-4"``, ``[1, 3]`` → ``"1,3"``, ``[]`` → ``""``."""
    layers = sorted(int(x) for x in layers)
    parts, i = [], 0
    while i < len(layers):
        j = i
        while j + 1 < len(layers) and layers[j + 1] == layers[j] + 1:
            j += 1
        parts.append(str(layers[i]) if i == j else f"{layers[i]}-{layers[j]}")
        i = j + 1
    return ",".join(parts)
