"""Forgetting under sequential tasks: LoRA vs spectral experts, trained on one task and then another.

The second seed result (Sparse Spectral LoRA, MedQwen) reports that routed spectral experts forget
about 5% of a first task after a second, where plain LoRA loses 20-50%. Here each method trains one
adapter on task 1 (questions on effusion, cardiomegaly, pneumothorax), then goes on training it on
task 2 (nodule, consolidation, edema): :func:`mechmed.forgetting.sequential_forgetting`. Reported:
accuracy on task 1 after each stage with Wilson 95% intervals, the drop with an exact McNemar test,
and the two methods compared on task 1 after task 2 (exact McNemar, same prompts). Pairs are split
by their ``finding`` field (the embedded default has one).

Writes ``forgetting.json`` (and each stage's run directory, ``<method>/task_1``, ``<method>/task_2``).
"""

from __future__ import annotations

import sys

from _common import is_demo, limit, parser, threads


def build_parser():
    p = parser(__doc__, "runs/analyses/forgetting")
    p.add_argument("--layers", default="2-4", help="decoder layers to adapt, e.g. 2-4 or 15-19")
    p.add_argument("--methods", default="lora,spectral_moe", help="adapter methods, comma-separated")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps per task (demo: 80, about one epoch of "
                   "a task's training pairs; else 300)")
    p.add_argument("--eval-pairs", type=int, default=None, help="held-out pairs per task, a seeded sample "
                   "(default all)")
    return p


def run(args) -> dict:
    from mechmed.config import TrainConfig, demo_defaults
    from mechmed.forgetting import sequential_forgetting
    from mechmed.sites import parse_layers

    base = demo_defaults() if is_demo(args) else {}
    cfg = TrainConfig.from_dict({**base, "model": args.model, "train_data": args.data, "eval_data": args.data,
                                 "seed": args.seed, "layers": parse_layers(args.layers)}, source="forgetting")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    res = sequential_forgetting(cfg, args.out, steps=limit(args, "steps", 80, 300), methods=methods,
                                n_eval=args.eval_pairs, device=args.device, progress=True)
    r = res.results
    acc = {t: r["results"]["base"][t] for t in ("task_1", "task_2")}
    print(f"task 1 = {', '.join(r['task_1'])}; task 2 = {', '.join(r['task_2'])}; {r['steps_per_task']} steps per "
          f"task on layers {r['layers']}, rank {r['rank']}; held-out prompts {acc['task_1']['n']}, {acc['task_2']['n']}")
    print(f"base model accuracy: task 1 {acc['task_1']['accuracy']:.3f}, task 2 {acc['task_2']['accuracy']:.3f}")
    print(f"{'method':<13} {'task 1 after 1':>22} {'task 1 after 2':>22} {'forgetting':>10} {'p':>7} "
          f"{'task 2 after 2':>22}")
    for m in r["methods"]:
        s = r["summary"][m]
        cell = {k: f"{s[k]:.3f} [{s[k + '_ci'][0]:.3f}, {s[k + '_ci'][1]:.3f}]"
                for k in ("task_1_after_task_1", "task_1_after_task_2", "task_2_after_task_2")}
        print(f"{m:<13} {cell['task_1_after_task_1']:>22} {cell['task_1_after_task_2']:>22} {s['forgetting']:>10.3f} "
              f"{s['forgetting_test']['p_value']:>7.3f} {cell['task_2_after_task_2']:>22}")
    if "methods_task_1_after_task_2" in r["summary"]:
        t = r["summary"]["methods_task_1_after_task_2"]
        print(f"task 1 after task 2, {r['methods'][0]} vs {r['methods'][1]}: {t['estimate_1']:.3f} vs "
              f"{t['estimate_2']:.3f}, exact McNemar p = {t['p_value']:.3f}")
    print(f"written {res.out}/forgetting.json")
    return r


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    with threads(args):
        run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
