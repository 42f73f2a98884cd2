"""Targeted vs full vs early LoRA: does training only the layers the flips come from work best?

Reproduces the seed paper's central comparison on MedGemma-4B + PSF-Med: LoRA on the
mechanistically selected layers (the paper's 15-19) against LoRA on every layer and on the early
layers of the same width, each against the untrained model, on the same held-out pairs. The grid is
:func:`mechmed.ablate.run_ablation` (arms ``selected``, ``all``, ``early`` by default; any of
``middle``, ``late``, ``random``, ``ce_only``, ``consistency_only`` can be added); the pairwise
tests between arms are :func:`mechmed.consistency.compare_runs`.

The targeted range comes from ``--config`` (a training config from ``attribution_table.py`` or
``mechmed select-layers``), ``--layers``, or, without either, from a layer attribution run here.
``--model`` and ``--data`` always apply; the config supplies the layers and hyperparameters.

Writes ``ablation/`` (results.json, results.csv, summary.csv, one run directory per arm),
``comparison.csv``, ``targeted_vs_full.json`` and ``flip_by_arm`` / ``tradeoff`` figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import (
    ablation_figures,
    compare,
    finish,
    is_demo,
    limit,
    parser,
    run_script,
    sample_pairs,
    write_csv,
)

ARMS = "selected,all,early"
#: Training options that keep the demo's run to seconds per arm (a real run keeps its config's).
DEMO_TRAINING = {"max_steps": 8, "batch_size": 8, "grad_accum": 1, "eval_every": 0, "checkpoint_every": 1000,
                 "guard_pairs": 16}


def build_parser():
    return add_options(parser(__doc__, "runs/analyses/targeted_vs_full"))


def add_options(p):
    """This script's options besides the common ones (statistics.py takes them too)."""
    p.add_argument("--config", default=None, help="training config YAML whose layers are the targeted range")
    p.add_argument("--layers", default=None, help="the targeted range, e.g. 15-19 (overrides --config's)")
    p.add_argument("--train-data", default=None, help="training pairs (default: --data; the demo's training split)")
    p.add_argument("--image-root", default=None, help="resolve image paths of both data files under this folder")
    p.add_argument("--arms", default=ARMS, help="ablation arms besides the untrained base")
    p.add_argument("--methods", default="lora", help="adapter methods: lora, spectral_moe")
    p.add_argument("--seeds", default="0", help="seeds, comma-separated")
    p.add_argument("--match-parameters", action="store_true", help="scale ranks to train ~as many parameters per arm")
    p.add_argument("--workers", type=int, default=1, help="arms trained in parallel processes")
    p.add_argument("--train-pairs", type=int, default=None, help="training pairs, a seeded sample (demo: 128; else all)")
    p.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs, a seeded sample (demo: 48; else all)")
    p.add_argument("--max-steps", type=int, default=None, help="optimiser steps per arm (demo: 8; else the config's)")
    p.add_argument("--attr-pairs", type=int, default=None, help="pairs attributed when the range is chosen here "
                   "(demo: 32; else 300)")
    p.add_argument("--width", type=int, default=None, help="width of a range chosen here (demo: 3; else 5)")
    return p


def _words(text: str) -> list[str]:
    return [w.strip() for w in text.split(",") if w.strip()]


def training_config(args, out: Path) -> dict:
    """The selected arm's training config: from --config, or chosen here from a layer attribution;
    then --layers, --model, the (sampled) data and the demo's small limits on top."""
    from mechmed.config import ModelSpec, TrainConfig
    from mechmed.sites import parse_layers

    if args.config:
        train = TrainConfig.load(args.config).to_dict()
    elif args.layers:
        from mechmed.config import demo_defaults

        train = demo_defaults() if is_demo(args) else {}
    else:
        from mechmed.stages import run_attribute, run_select_layers

        run_attribute(args.model, args.data, None, str(out / "attribute"), max_pairs=limit(args, "attr_pairs", 32, 300),
                      exact=False, device=args.device, image_root=args.image_root, seed=args.seed)
        cfg, _ = run_select_layers(str(out / "attribute" / "layer_scores.json"), str(out / "train.yaml"),
                                   width=limit(args, "width", 3, 5), model=args.model, data=args.data, saes=None,
                                   seed=args.seed)
        train = cfg.to_dict()
    train.pop("config_version", None)
    if args.layers:
        train["layers"] = parse_layers(args.layers)
    if is_demo(args):
        train.update(DEMO_TRAINING)
    if args.max_steps is not None:
        train["max_steps"] = args.max_steps
    data = out / "data"
    train.update(model=ModelSpec.from_args(args, train.get("model")).to_value(), image_root=args.image_root, seed=args.seed,
                 train_data=sample_pairs(args.train_data or args.data, "train", limit(args, "train_pairs", 128),
                                         args.seed, data / "train_pairs.jsonl", args.image_root),
                 eval_data=sample_pairs(args.data, "eval", limit(args, "eval_pairs", 48), args.seed,
                                        data / "eval_pairs.jsonl", args.image_root))
    return train


def comparisons(results_dir: Path, rows: list[dict], reference: str) -> list[dict]:
    """``reference`` (the targeted arm) against every other trained range, per method and seed."""
    from mechmed.ablate import RANGE_ARMS, Arm

    out = []
    for r in rows:
        if r["arm"] not in RANGE_ARMS:
            continue
        ref = results_dir / "arms" / Arm(reference, r["method"], r["seed"], ()).name / "after"
        other = results_dir / "arms" / Arm(r["arm"], r["method"], r["seed"], ()).name / "after"
        if ref.is_dir():
            out.append(compare(ref, other, a=reference, b=r["arm"], method=r["method"], seed=r["seed"]))
    return out


def run(args) -> dict:
    from mechmed.ablate import AblationConfig, format_table, run_ablation

    out = Path(args.out)
    train = training_config(args, out)
    cfg = AblationConfig.from_dict({"train": train, "arms": _words(args.arms), "methods": _words(args.methods),
                                    "seeds": [int(s) for s in _words(args.seeds)], "workers": args.workers,
                                    "match_parameters": args.match_parameters}, source="targeted_vs_full")
    res = run_ablation(cfg, out / "ablation", workers=args.workers)
    table = comparisons(res.out, res.rows, "selected")
    write_csv(out / "comparison.csv", table)
    print(format_table(res.summary))
    return finish(out, {"model": args.model, "data": args.data, "selected_layers": train["layers"],
                        "results": str(res.out / "results.json"), "summary": res.summary, "comparisons": table,
                        "figures": ablation_figures(res.summary, out)}, "targeted_vs_full.json")


def main(argv=None) -> int:
    return run_script(build_parser, run, argv)


if __name__ == "__main__":
    sys.exit(main())
