"""Process policy, in one place: torch CPU threads, the Hugging Face offline flag, mechmed's cache root.

Entry points (the command line, :func:`mechmed.pipeline.run_pipeline`, the analysis scripts, a worker process
of the ablation grid) apply the thread policy once with :func:`torch_threads`, which restores the
caller's setting afterwards; library functions read the policy from here and never set it for good.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Widths at or under which one torch thread is fastest (the demo, the tiny test models).
ONE_THREAD_WIDTH = 256
_TRUE_WORDS = ("1", "true", "yes", "on")


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run the block with ``n`` torch threads (None: leave the setting alone), restored after."""
    import torch

    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def threads_for_width(d_model: int) -> int | None:
    """1 for models at most :data:`ONE_THREAD_WIDTH` wide, else None (torch's setting): such matmuls
    gain nothing from OpenMP threads and run many times slower when the cores are shared."""
    return 1 if int(d_model) <= ONE_THREAD_WIDTH else None


def hub_offline(*, datasets: bool = False) -> bool:
    """Whether the user asked Hugging Face libraries to stay offline: ``HF_HUB_OFFLINE`` (and
    ``HF_DATASETS_OFFLINE`` when ``datasets``) set to 1/true/yes/on."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(k, "").strip().lower() in _TRUE_WORDS for k in names)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """mechmed's cache directory: ``cache_dir``, else ``$MECHMED_CACHE``, else ``~/.cache/mechmed``."""
    root = cache_dir or os.environ.get("MECHMED_CACHE") or Path.home() / ".cache" / "mechmed"
    return Path(root).expanduser()
