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


@contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Hugging Face's progress bars (transformers' and huggingface_hub's) off for the block unless
    ``enabled``; the user's setting is restored after. Library code that reads or writes local files
    draws nothing; a download keeps its bars."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if was and not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def hub_offline(*, datasets: bool = False) -> bool:
    """Whether the user asked Hugging Face libraries to stay offline: ``HF_HUB_OFFLINE`` (and
    ``HF_DATASETS_OFFLINE`` when ``datasets``) set to 1/true/yes/on."""
    names = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if datasets else ("HF_HUB_OFFLINE",)
    return any(os.environ.get(k, "").strip().lower() in _TRUE_WORDS for k in names)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """mechmed's cache directory: ``cache_dir``, else ``$MECHMED_CACHE``, else ``~/.cache/mechmed``."""
    root = cache_dir or os.environ.get("MECHMED_CACHE") or Path.home() / ".cache" / "mechmed"
    return Path(root).expanduser()


def check_device(device: str) -> str:
    """``device`` if this torch can run on it, else a one-line error that says what to use instead.
    ``auto`` is ``cuda`` where this torch sees a GPU, else ``cpu``."""
    import torch

    from mechmed.errors import MechmedError

    if str(device) == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(str(device))
    except (RuntimeError, ValueError):
        raise MechmedError(f"--device {device}: not a torch device; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "is a CPU-only build" if torch.version.cuda is None else "sees no GPU"
            raise MechmedError(f"--device {device}: this torch ({torch.__version__}) {why}; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MechmedError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible "
                               f"(cuda:0-{torch.cuda.device_count() - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise MechmedError(f"--device {device}: MPS is not available here; use --device cpu")
    return str(device)


def versions() -> dict:
    """The versions of mechmed and the libraries its results depend on, and mechmed's git commit when it
    runs from a checkout: recorded beside every result."""
    import importlib.metadata as md
    import subprocess

    out = {}
    for pkg in ("mechmed", "torch", "transformers", "peft", "accelerate", "sae-lens", "transformer-lens", "nnsight"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    try:
        here = Path(__file__).resolve().parent
        git = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        out["git"] = git.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        out["git"] = None
    return out
