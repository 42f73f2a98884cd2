"""Pieces the analysis scripts share: their common options, small pair samples, tables and figures.

Everything that computes a result lives in :mod:`mechmed`; this module only parses options and
writes files.
"""

from __future__ import annotations

import argparse
import csv
import io
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

DEMO = "demo"
DATA_HELP = "'demo', or a pairs file / directory (pairs.jsonl + images), e.g. path/to/psf-med"


def parser(doc: str | None, out: str, data_help: str = DATA_HELP) -> argparse.ArgumentParser:
    """An argument parser with the options every analysis takes (``--model``, ``--data``, ``--out`` ...)."""
    p = argparse.ArgumentParser(description=(doc or "").strip().split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=DEMO,
                   help="'demo' (the embedded default), a hub id such as google/medgemma-4b-it, or a checkpoint dir")
    p.add_argument("--data", default=DEMO, help=data_help)
    p.add_argument("--out", default=out, help="output directory")
    p.add_argument("--device", default="cpu", help="torch device: cpu, cuda, cuda:1")
    p.add_argument("--seed", type=int, default=0, help="random seed (also picks the demo model and data)")
    return p


def add_saes(p: argparse.ArgumentParser) -> None:
    p.add_argument("--saes", default=DEMO, help="'demo', a directory of per-layer sae-lens SAEs, or RELEASE:ID_TEMPLATE, "
                   "e.g. gemma-scope-2-4b-it-res-all:layer_{L}_width_16k_l0_big")


def is_demo(args) -> bool:
    return args.model == DEMO


def limit(args, name: str, demo_value, real_value=None):
    """The option ``name``: as given, else ``demo_value`` on the demo model and ``real_value`` otherwise."""
    value = getattr(args, name)
    if value is not None:
        return value
    return demo_value if is_demo(args) else real_value


@contextmanager
def threads(args) -> Iterator[None]:
    """Run the block with mechmed's CPU thread rule for the model's width (one thread for models as
    small as the demo, whose matmuls run many times slower on threads that share their cores)."""
    from mechmed.models import cpu_threads_for
    from mechmed.runtime import torch_threads

    with torch_threads(cpu_threads_for(args.model, args.device)):
        yield


def sample_pairs(data: str, split: str, n: int | None, seed: int, path: Path, image_root=None) -> str:
    """``data`` itself when ``n`` is None; else a seeded sample of ``n`` of its pairs (the demo's
    ``split``: train or eval), written to ``path`` as a pairs file whose path is returned."""
    if n is None:
        return data
    import numpy as np

    from mechmed.data import write_pairs
    from mechmed.train import resolve_pairs

    pairs = resolve_pairs(data, split=split, image_root=image_root, seed=seed)
    keep = sorted(np.random.default_rng(seed).permutation(len(pairs))[:n])
    path.parent.mkdir(parents=True, exist_ok=True)
    return str(write_pairs([pairs[i] for i in keep], path))


def write_csv(path: str | os.PathLike, rows: Sequence[dict]) -> Path:
    """``rows`` (dicts with the same keys) as CSV; lists become ``a;b`` cells."""
    from mechmed.io import write_text

    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        for r in rows:
            w.writerow({k: ";".join(map(str, v)) if isinstance(v, (list, tuple)) else v for k, v in r.items()})
    return write_text(path, buf.getvalue())


def save_figures(figures: dict, out: Path, png: bool = True) -> dict:
    """Save each ``{name: plotly figure}`` as ``out/name.html`` (+ ``.png``); returns the paths."""
    from mechmed.figures import save_figure

    return {name: save_figure(fig, out / name, png=png) for name, fig in figures.items()}


def finish(out: Path, result: dict, name: str) -> dict:
    """Write ``result`` as ``out/name`` (JSON) and say where everything is."""
    from mechmed.io import write_json

    write_json(out / name, result)
    print(f"written {out}/{name}")
    return result


def compare(a_dir: Path, b_dir: Path, **labels) -> dict:
    """One row comparing evaluation A with B (:func:`mechmed.consistency.compare_runs`): flip rate
    and accuracy with Wilson CIs and two-proportion z tests, and, on shared pairs, the exact McNemar
    test of the flips and the paired bootstrap of |Δmargin| (A − B)."""
    from mechmed.consistency import compare_runs

    c = compare_runs(a_dir, b_dir)
    flip, acc, paired = c["flip_rate"], c["accuracy_original"], c["paired"] or {}
    mc, bs = paired.get("mcnemar_flips", {}), paired.get("margin_diff_bootstrap", {})
    return {**labels,
            "flip_a": flip["a"]["estimate"], "flip_a_ci": [flip["a"]["low"], flip["a"]["high"]],
            "flip_b": flip["b"]["estimate"], "flip_b_ci": [flip["b"]["low"], flip["b"]["high"]],
            "flip_z": flip["test"]["statistic"], "flip_p_ztest": flip["test"]["p_value"],
            "flip_p_mcnemar": mc.get("p_value"), "n_common_pairs": paired.get("n_common_pairs", 0),
            "margin_diff_a": c["margin_diff"]["a"], "margin_diff_b": c["margin_diff"]["b"],
            "margin_diff_a_minus_b": bs.get("estimate"), "margin_diff_a_minus_b_ci": [bs.get("low"), bs.get("high")],
            "margin_diff_p_bootstrap": bs.get("p_value"),
            "accuracy_a": acc["a"]["estimate"], "accuracy_b": acc["b"]["estimate"],
            "accuracy_p_ztest": acc["test"]["p_value"]}


def ablation_figures(summary: list, out: Path) -> dict:
    """The ablation's flip-rate / |Δmargin| bars and accuracy-vs-flip trade-off, saved under ``out``."""
    from mechmed.figures import flip_by_arm, tradeoff

    return save_figures({"flip_by_arm": flip_by_arm(summary), "tradeoff": tradeoff(summary)}, out)


def run_script(build_parser, run, argv=None) -> int:
    """Parse ``argv`` with ``build_parser()`` and call ``run(args)`` under :func:`threads`, in deterministic
    CPU mode on the embedded default (a script started from a shell restarts itself into it before
    torch loads); 0 when done."""
    from mechmed.runtime import deterministic, reexec_deterministic, warn_if_not_deterministic

    args = build_parser().parse_args(argv)
    if argv is None:
        reexec_deterministic(args.model)
    warn_if_not_deterministic(args.model)
    with threads(args), deterministic(args.device):
        run(args)
    return 0
