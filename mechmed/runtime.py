"""Process policy, in one place: torch CPU threads, deterministic CPU mode, the Hugging Face offline
flag, mechmed's cache root.

Entry points (the command line, :func:`mechmed.pipeline.run_pipeline`, the analysis scripts, a worker process
of the ablation grid) apply the thread policy once with :func:`torch_threads`, which restores the
caller's setting afterwards; library functions read the policy from here and never set it for good.

**Deterministic CPU mode** (on by default for the embedded default): the same seed gives the same
bits on any x86-64 machine with AVX2. A CPU's own features pick the code path of MKL's matmuls, of ATen's
vectorised kernels, of oneDNN's convolutions and of numpy's SIMD loops, and each path rounds
differently; the mode pins every one to a path that all such CPUs run (:data:`DETERMINISTIC_ENV`,
read once when those libraries load, so the command line re-executes itself with them before torch
is imported: :func:`reexec_deterministic`), keeps convolutions off oneDNN, asks torch for its
deterministic algorithms (:func:`deterministic`, around each entry point's work), and trains at fixed
thread counts.
:func:`determinism_state` says what was in force; every run records it.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

#: Widths at or under which one torch thread is fastest (the demo, the tiny test models).
ONE_THREAD_WIDTH = 256
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")

#: ``1``: deterministic CPU mode on for every command; ``0``: off; unset: on for the embedded default.
MODE_VARIABLE = "MECHMED_DETERMINISTIC"
#: Settings read once when a library loads, each pinning one code path on every x86-64 CPU with AVX2
#: (Intel since 2013, AMD since 2015). ATen's ``default`` kernels would cover older CPUs too, at half
#: the speed again (benchmarks/determinism.py); a CPU without AVX2 runs them anyway and is told so.
DETERMINISTIC_ENV = {
    "MKL_CBWR": "COMPATIBLE",  # MKL's conditional numerical reproducibility: one SSE2 path on Intel and AMD
    "ATEN_CPU_CAPABILITY": "avx2",  # ATen's AVX2 kernels, not the AVX-512 ones a newer CPU would pick
    "ONEDNN_MAX_CPU_ISA": "SSE41",  # oneDNN's lowest ISA, for any op that still reaches it
    "NPY_DISABLE_CPU_FEATURES": "X86_V3 X86_V4 AVX512_ICL AVX512_SPR",  # numpy's SIMD loops at its baseline
}
#: What ATen must report (``torch.backends.cpu.get_cpu_capability()``) for the mode's numbers to hold.
PINNED_CAPABILITY = "AVX2"


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


def mode_requested(model: str | None) -> bool:
    """Whether deterministic CPU mode is asked for: :data:`MODE_VARIABLE` if set, else whether
    ``model`` names an embedded default (``demo``, ``demo:...``)."""
    value = os.environ.get(MODE_VARIABLE, "").strip().lower()
    if value in _TRUE_WORDS:
        return True
    if value in _FALSE_WORDS:
        return False
    return model is not None and str(model).split(":", 1)[0] == "demo"


def deterministic_env(environ: dict | None = None) -> dict:
    """``environ`` (default ``os.environ``) with :data:`DETERMINISTIC_ENV` and the mode flag set: what a
    process must start with. Set it in ``os.environ`` before torch and numpy are imported (a notebook's
    first cell: ``os.environ.update(mechmed.runtime.deterministic_env())``), or start a process with it."""
    env = dict(os.environ if environ is None else environ)
    env.update(DETERMINISTIC_ENV)
    env[MODE_VARIABLE] = "1"
    return env


def env_pinned(environ: dict | None = None) -> bool:
    """Whether every setting of :data:`DETERMINISTIC_ENV` is in ``environ`` (default ``os.environ``)."""
    env = os.environ if environ is None else environ
    return all(env.get(k) == v for k, v in DETERMINISTIC_ENV.items())


def reexec_deterministic(model: str | None, argv: list[str] | None = None) -> None:
    """Restart this process's command (``argv``, default ``sys.argv``) with :func:`deterministic_env` when
    the mode is asked for (:func:`mode_requested`) and its settings are not in force yet. Call it before
    torch or numpy is imported (they read the settings once, when they load); it returns when nothing
    needs restarting, or when the command cannot be restarted (``python -c``, an interactive session)."""
    import sys

    argv = list(sys.argv if argv is None else argv)
    if not mode_requested(model) or env_pinned() or "torch" in sys.modules or "numpy" in sys.modules:
        return
    if not argv or argv[0] in ("", "-c", "-m"):
        return
    script, package = Path(argv[0]).resolve(), Path(__file__).resolve().parent
    if script.parent == package:  # python -m mechmed[.cli]: running the file would shadow io, ... with ours
        module = "mechmed" if script.stem == "__main__" else f"mechmed.{script.stem}"
        command = [sys.executable, "-m", module, *argv[1:]]
    else:
        command = [sys.executable, *argv]
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, command, deterministic_env())


def cpu_mode() -> str:
    """``deterministic`` or ``default``: part of the cache key of anything trained on the CPU, since the
    two modes give different bits."""
    return "deterministic" if mode_active() else "default"


def mode_active() -> bool:
    """Whether this process runs in deterministic CPU mode: :data:`MODE_VARIABLE` is on, as
    :func:`reexec_deterministic` and :func:`deterministic_env` leave it. Whether the process-level
    settings are in force too is :func:`env_pinned`; :func:`determinism_state` records both."""
    return os.environ.get(MODE_VARIABLE, "").strip().lower() in _TRUE_WORDS


@contextmanager
def deterministic(device: str = "cpu") -> Iterator[bool]:
    """In deterministic mode on the CPU, run the block with convolutions off oneDNN and torch's
    deterministic algorithms on, restored after; yields whether the mode is in force. GPU kernels are
    not made bit-identical: on another device, and outside the mode, nothing changes."""
    if not mode_active() or not str(device).startswith("cpu"):
        yield False
        return
    import logging

    import torch

    if env_pinned() and torch.backends.cpu.get_cpu_capability() != PINNED_CAPABILITY:
        logging.getLogger("mechmed").warning(
            "deterministic CPU mode: this CPU runs ATen's %s kernels, not %s (it lacks AVX2), so its numbers are "
            "repeatable here but differ from those of other machines", torch.backends.cpu.get_cpu_capability(),
            PINNED_CAPABILITY)
    mkldnn, algorithms = torch.backends.mkldnn.enabled, torch.are_deterministic_algorithms_enabled()
    torch.backends.mkldnn.enabled = False
    torch.use_deterministic_algorithms(True)
    try:
        yield True
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        torch.use_deterministic_algorithms(algorithms)


def warn_if_not_deterministic(model: str | None) -> None:
    """A warning when deterministic mode is asked for ``model`` but this process started without its
    settings (torch was imported first, e.g. in a notebook): results then match other machines' only by
    chance."""
    import logging

    if mode_requested(model) and not (mode_active() and env_pinned()):
        logging.getLogger("mechmed").warning(
            "deterministic CPU mode: this process started without %s, so its numbers can differ on another "
            "CPU; run the mechmed command, or os.environ.update(mechmed.runtime.deterministic_env()) before "
            "importing torch (%s=0 silences this)", ", ".join(DETERMINISTIC_ENV), MODE_VARIABLE)


def determinism_state() -> dict:
    """What this process's results depend on, recorded beside every run: the mode, the pinned settings as
    the process saw them, the code paths torch reports, and the thread count."""
    import torch

    try:
        from numpy._core._multiarray_umath import __cpu_features__ as npy_features
    except ImportError:  # numpy < 2
        npy_features = {}
    return {
        "mode": cpu_mode(),
        "env": {k: os.environ.get(k) for k in DETERMINISTIC_ENV},
        "env_pinned": env_pinned(),
        "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "numpy_simd": sorted(k for k in ("X86_V2", "X86_V3", "X86_V4") if npy_features.get(k)),
        "mkldnn_enabled": bool(torch.backends.mkldnn.enabled),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
        "torch_threads": torch.get_num_threads(),
    }


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
