"""The ``mechmed`` command line: a thin layer over library functions.

Each command parses its options, calls the library's stage for it (:mod:`mechmed.stages`,
:func:`mechmed.train.train`, :func:`mechmed.ablate.run_ablation`, :func:`mechmed.pipeline.run_pipeline`)
and prints what it wrote. Heavy libraries are imported inside the commands, so ``mechmed --help`` is
instant. A
:class:`~mechmed.errors.MechmedError` is printed as one line and exits 2; ``main(argv)`` returns
the exit code, so tests call it directly.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mechmed import __version__
from mechmed.config import STRATEGIES
from mechmed.errors import EXIT_USAGE, MechmedError
from mechmed.pipeline import DEMO_ARMS

log = logging.getLogger("mechmed")

#: Commands whose --out holds finished, reusable stages that a later error must not remove.
ROLLBACK_EXEMPT = ("ablate", "demo", "capture")


def _words(text: str) -> tuple[str, ...]:
    return tuple(w.strip() for w in text.split(","))


def _add_device_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="torch device: auto (CUDA where present, else CPU), cpu, cuda, "
                   "cuda:1 (default auto)")
    p.add_argument("--dtype", default=None, choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights dtype (default: float32 on CPU, bfloat16 on CUDA)")


def _add_model_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="demo",
                   help="hub id (google/medgemma-4b-it), local checkpoint directory, a .gguf file, or 'demo' (default)")
    p.add_argument("--gguf-file", default=None, metavar="NAME.gguf",
                   help="the GGUF file inside --model (a local directory or a hub repository); read once through "
                   "transformers (needs mechmed[gguf]) and cached as safetensors")
    _add_device_options(p)
    p.add_argument("--answer-words", type=_words, default=("yes", "no"),
                   help="the two answer words, each a single token (default yes,no)")
    p.add_argument("--prompt-template", default=None, metavar="TEXT",
                   help="build prompts from TEXT with {question} (and {image}) instead of the chat template "
                   "(default: the chat template; a model without one: 'Question: {question}\\nAnswer:')")
    _add_load_options(p)
    p.add_argument("--seed", type=int, default=0, help="random seed (also picks the demo model/data)")


def _add_load_options(p: argparse.ArgumentParser, config: bool = False) -> None:
    """How a model is opened (:class:`mechmed.config.ModelSpec`); ``config``: for a command whose
    training config holds them, where the options given override the config's."""
    but = "; given here, it replaces the config's model option" if config else ""
    p.add_argument("--device-map", default=None, choices=["auto", "balanced", "balanced_low_0", "sequential"],
                   help="spread a model too large for one card over the visible GPUs (accelerate's device_map; "
                   "default: all on --device)" + but)
    p.add_argument("--trust-remote-code", action="store_true", default=None,
                   help="allow a checkpoint's own Python code to run (off by default)" + but)
    p.add_argument("--revision", default=None,
                   help="hub model revision: a branch, tag or commit (default main)" + but)
    p.add_argument("--local-files-only", action="store_true", default=None,
                   help="never download; use what is in the cache (default: as HF_HUB_OFFLINE says)" + but)
    p.add_argument("--cache-dir", default=None, help="download cache of a hub model (default Hugging Face's); for "
                   "'demo', where it is built (default $MECHMED_CACHE or ~/.cache/mechmed)" + but)


def _fmt(x) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return f"{x:.3f}"
    if isinstance(x, list) and len(x) == 2 and all(isinstance(v, float) for v in x):
        return f"[{x[0]:.3f}, {x[1]:.3f}]"
    return str(x)


def print_metrics(m: dict, out=None) -> None:
    from mechmed.consistency import QUADRANTS

    out = out or sys.stdout  # looked up at the call, not at import: sys.stdout may have been replaced
    rows = [
        ("pairs / questions", f"{m['n_pairs']} / {m['n_questions']}"),
        ("accuracy (original)", _fmt(m["accuracy"]["original"])),
        ("accuracy (paraphrase)", _fmt(m["accuracy"]["paraphrase"])),
        ("flip rate" + (" (negation set)" if m.get("headline") == "negation" else ""),
         f"{_fmt(m['flip_rate'])} {_fmt(m['flip_rate_ci'])} ({m['n_flips']}/{m['n_pairs']})"
         + (f"; by question {_fmt(m['flip_rate_ci_clustered'])}" if m.get("flip_rate_ci_clustered") else "")),
        *([("negation-set flip rate", f"{_fmt(n['flip_rate'])} {_fmt(n['flip_rate_ci'])} "
                                      f"({n['n_flips']}/{n['n_pairs']})")] if (n := m.get("negation")) else []),
        *([("near-tie flips", f"{_fmt(m['near_tie_flip_rate'])} ({m['n_near_tie_flips']} with both margins "
                               f"within {m['near_tie']} of 0)")] if "near_tie_flip_rate" in m else []),
        ("question flip rate", _fmt(m["question_flip_rate"])),
        ("mean |Δmargin|", f"{_fmt(m['margin_diff'])} {_fmt(m['margin_diff_ci'])}"),
        ("AUC", _fmt(m["auc"])),
        *([("flips foreseen by |margin|", f"AUROC {_fmt(r['auroc_margin'])} {_fmt(r['auroc_margin_ci'])}"),
           ("calibration", f"ECE {_fmt(r['ece'])}"),
           (f"coverage at {r['coverage']['risk']:.0%} risk", _fmt(r["coverage"]["coverage"]))]
          if (r := m.get("flip_risk")) else []),
        ("yes rate", _fmt(m["yes_rate"])),
        ("blank-image agreement", _fmt(m.get("blank_image_agreement"))),
        ("swap sensitivity", _fmt(m.get("swap_sensitivity"))),
        ("counterfactual sensitivity", _fmt(m.get("counterfactual_sensitivity"))),
        *([("image-reliant pairs", f"counterfactual {_fmt(ir['counterfactual'])}, gray image {_fmt(ir['gray'])} "
                                   f"(the two agree on {_fmt(ir['agreement'])})")] if (ir := m.get("image_reliance"))
          else []),
        *[(f"  {name.replace('_', ' ')}", f"{_fmt(c['share'])} {_fmt(c['ci'])} ({c['n']})")
          for name, c in ((k, m["quadrants"][k]) for k in QUADRANTS if m.get("quadrants"))],
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"  {k:<{width}}  {v}", file=out)


def cmd_evaluate(args) -> int:
    from mechmed.stages import run_evaluate

    result = run_evaluate(args.model, args.data, args.out, adapter=args.adapter, batch_size=args.batch_size,
                          device=args.device, image_root=args.image_root, limit=args.limit, seed=args.seed,
                          controls=not args.no_controls, progress=True, risk=args.risk, **model_options(args))
    print(f"evaluated {args.model} on {args.data}: {args.out}/metrics.json")
    print_metrics(result.metrics)
    return 0


def cmd_compare(args) -> int:
    from mechmed.consistency import QUADRANTS, compare_runs
    from mechmed.io import write_json

    res = compare_runs(args.a, args.b)
    paired = res["paired"]
    # the paired tests first: on the same pairs they are the ones to read; the unpaired z test after
    for key in ("flip_rate", "accuracy_original", "accuracy_paraphrase"):
        r, t = res[key], res[key]["test"]
        first = ""
        if key == "flip_rate" and paired:
            first = (f"McNemar p = {paired['mcnemar_flips']['p_value']:.4f} (paired, {paired['n_common_pairs']} "
                     "pairs)" + (f", clustered by question p = {c['p_value']:.4f} ({paired['n_common_questions']} "
                                 "questions)" if (c := paired.get("mcnemar_flips_clustered")) else "") + "; ")
        print(f"{key:<20} A {r['a']['estimate']:.3f} -> B {r['b']['estimate']:.3f}   {first}"
              f"two-proportion z = {t['statistic']:.2f}, p = {t['p_value']:.4f}")
    md = res["margin_diff"]
    line = f"{'mean |Δmargin|':<20} A {_fmt(md['a'])} -> B {_fmt(md['b'])}"
    if paired:
        bs = paired["margin_diff_bootstrap"]
        line += (f"   A−B = {bs['estimate']:.3f} [{bs['low']:.3f}, {bs['high']:.3f}], paired bootstrap "
                 f"p = {bs['p_value']:.4f}")
    print(line)
    if res.get("negation"):
        neg = res["negation"]
        r, t = neg["flip_rate"], neg["flip_rate"]["test"]
        line = (f"{'negation flip rate':<20} A {r['a']['estimate']:.3f} -> B {r['b']['estimate']:.3f}   "
                f"z = {t['statistic']:.2f}, p = {t['p_value']:.4f}")
        if neg["paired"]:
            line += f"; McNemar p = {neg['paired']['mcnemar_flips']['p_value']:.4f}"
        print(line)
    nt = res.get("near_tie_flip_rate") or {}
    if nt.get("a") is not None and nt.get("b") is not None:
        print(f"{'near-tie flips':<20} A {nt['a']:.3f} -> B {nt['b']:.3f}   (both margins within the near-tie "
              "tolerance of 0)")
    quad = res.get("quadrants")
    if quad:
        print(f"quadrants (consistency × {quad.get('definition', 'gray')} image reliance, "
              f"{quad['n_common_pairs']} shared pairs):")
        for name in QUADRANTS:
            a, b, p = quad["a"][name], quad["b"][name], quad["p"][name]
            pc = (quad.get("p_clustered") or {}).get(name)
            print(f"  {name:<20} A {a['share']:.3f} [{a['ci'][0]:.3f}, {a['ci'][1]:.3f}] -> "
                  f"B {b['share']:.3f} [{b['ci'][0]:.3f}, {b['ci'][1]:.3f}]"
                  + ("" if p is None else f"   McNemar p = {p:.4f}")
                  + ("" if pc is None else f", clustered by question p = {pc:.4f}"))
    risk = res.get("flip_risk")
    if risk and risk.get("difference") is not None:
        print(f"{'flips foreseen':<20} A {risk['auc_a']:.3f} -> B {risk['auc_b']:.3f}   (AUROC of |margin|, "
              f"{risk['n_common_pairs']} shared pairs; B − A {risk['difference']:+.3f} "
              f"[{risk['ci'][0]:+.3f}, {risk['ci'][1]:+.3f}], bootstrap p by question = {risk['p_value']:.4f})")
    if args.out:
        write_json(args.out, res)
        print(f"written {args.out}")
    return 0


def model_options(args) -> dict:
    """The shared model-loading options (--dtype, --answer-words, --trust-remote-code, --revision,
    --local-files-only, --cache-dir, --device-map, --prompt-template) as keywords."""
    return {"dtype": args.dtype, "answer_words": tuple(args.answer_words),
            "trust_remote_code": bool(args.trust_remote_code),
            "revision": args.revision, "local_files_only": args.local_files_only, "cache_dir": args.cache_dir,
            "device_map": args.device_map, "prompt_template": args.prompt_template}


def cmd_sae_check(args) -> int:
    from mechmed.fidelity import format_table
    from mechmed.stages import run_sae_check

    res = run_sae_check(args.model, args.saes, args.layers, args.texts, args.out, threshold=args.threshold,
                        batch_size=args.batch_size, device=args.device, ce=not args.no_ce, seed=args.seed,
                        **model_options(args))
    print(format_table(res.rows))
    print(f"written {args.out}/sae_check.json and r2_by_layer.html")
    return 0


def cmd_capture(args) -> int:
    from mechmed.stages import run_capture

    res = run_capture(args.model, args.data, args.out, layers=args.layers, kind=args.kind, positions=args.positions,
                      max_pairs=args.max_pairs, shard_size=args.shard_size, batch_size=args.batch_size,
                      store_dtype=args.store_dtype, backend=args.backend, device=args.device,
                      image_root=args.image_root, seed=args.seed, progress=True, **model_options(args))
    kept = f" ({len(res.skipped)} already on disk)" if res.skipped else ""
    print(f"captured {res.n_prompts} prompts into {res.n_shards} shards{kept}: {res.path}")
    print(f"read it with: from mechmed.store import ActivationStore; store = ActivationStore({str(res.path)!r})")
    return 0


def cmd_attribute(args) -> int:
    from mechmed.stages import run_attribute

    s = run_attribute(args.model, args.data, None if args.saes == "none" else args.saes, args.out,
                      max_pairs=args.max_pairs, exact=not args.no_exact, top_features=args.top_features,
                      batch_size=args.batch_size, split=args.split, device=args.device, image_root=args.image_root,
                      seed=args.seed, progress=True, **model_options(args))
    a = s["scores"]["attr_flipped" if s["n_flipped"] else "attr_all"]["mean"]
    print(f"attributed {s['n_pairs']} pairs ({s['n_flipped']} flipped) over {s['n_layers']} layers: {args.out}")
    print("  layer  mean |attribution|" + ("   exact |patch|" if "patch_flipped" in s["scores"] else ""))
    for layer, v in enumerate(a):
        extra = ""
        if "patch_flipped" in s["scores"] and s["scores"]["patch_flipped"]["mean"][layer] is not None:
            extra = f"   {s['scores']['patch_flipped']['mean'][layer]:.4f}"
        print(f"  {layer:>5}  {v:.4f}{extra}")
    if "spearman_gain_patch" in s:
        print(f"  Spearman(gain, exact patching's gain) = {s['spearman_gain_patch']:.3f} (layer index alone: "
              f"{s['spearman_index_patch']:.3f})")
    return 0


def cmd_select_layers(args) -> int:
    from mechmed.stages import run_select_layers

    overrides = {k: v for k, v in config_from_args(args).items() if k not in ("layers", "model", "method", "seed")}
    from mechmed.selection import SelectionUncertainty

    cfg, chosen = run_select_layers(args.scores, args.out, strategy=args.strategy, width=args.width, k=args.k,
                                    threshold=args.threshold, score=args.score, method=args.method or "lora",
                                    model=args.model, data=args.data, saes=args.saes, seed=args.seed or 0,
                                    overrides=overrides, device=args.device, dtype=args.dtype, p_best=args.p_best)
    unc = (cfg.provenance or {}).get("uncertainty")
    if unc:
        unc = SelectionUncertainty.from_dict(unc)
        print(f"{args.score} summed over each candidate, with its {unc.confidence:.0%} interval and how often it is "
              f"the best over {unc.n_bootstrap} resamples of the {unc.n_questions} attributed questions:")
        print(unc.table())
    print(f"selected layers {list(chosen.layers)} ({chosen.strategy}, {args.score}); config: {args.out}")
    print(f"next: mechmed train --config {args.out} --out runs/train")
    return 0


def cmd_demo_model(args) -> int:
    from mechmed.sources import get

    demo = get("demo")
    path = demo.model_dir(cache_dir=args.cache_dir, seed=args.seed, force=args.force)
    data = demo.data_dir(cache_dir=args.cache_dir, seed=args.seed)
    print(f"demo model: {path}")
    print(f"demo data:  {data}")
    metrics = path / "build_metrics.json"
    if metrics.is_file():
        print(metrics.read_text().strip())
    return 0


def cmd_demo(args) -> int:
    import os
    import warnings

    from mechmed.ablate import ARMS
    from mechmed.pipeline import run_pipeline

    unknown = [a for a in args.arms if a not in ARMS or a == "base"]
    if unknown:
        raise MechmedError(f"--arms: unknown {', '.join(unknown)}; choose from {', '.join(ARMS[1:])}")
    # peft asks transformers a deprecated question on every adapter: noise the demo's reader cannot act on
    quiet = "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning"
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    os.environ["PYTHONWARNINGS"] = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), quiet) if w)  # workers
    print(f"mechmed demo: the whole chain on the embedded default, into {args.out}", flush=True)
    t0 = time.perf_counter()
    res = run_pipeline(args.out, seed=args.seed, width=args.width, workers=args.workers, arms=tuple(args.arms),
                       methods=tuple(args.methods), max_pairs=args.max_pairs, echo=True, device=args.device,
                       audit=None if args.audit is None else {"random_sets": args.audit},
                       dtype=args.dtype or "float32")  # float32 on a GPU too: the numbers of docs/demo.md
    print(f"done in {time.perf_counter() - t0:.0f} s; open {res.out / 'report.html'} (summary: {res.out / 'report.md'})")
    return 0


def cmd_ablate(args) -> int:
    from mechmed.ablate import AblationConfig, format_table, run_ablation, run_arms, write_plan
    from mechmed.config import ModelSpec

    modes = [m for m in ("plan", "arm", "collect") if getattr(args, m)]
    if len(modes) > 1:
        raise MechmedError(f"ablate: --{modes[0]} and --{modes[1]} are separate steps; give one of them")
    if args.devices and (args.plan or args.arm or args.collect):
        raise MechmedError("ablate: --devices spreads a whole grid over local devices; with --plan, --arm or "
                           "--collect give --device")
    cfg = AblationConfig.load(args.config)  # the loading options given here go into every arm's config
    cfg.train["model"] = ModelSpec.from_args(args, cfg.train["model"]).to_value()
    if args.plan:
        d = write_plan(cfg, args.out, device=args.device, dtype=args.dtype)
        n = sum(1 for line in (d / "commands.txt").read_text().splitlines() if " --arm " in line)
        print(f"plan: {n} runs in {d / 'commands.txt'} (one per line; a job array can run line $TASK_ID), one "
              f"training config per trained arm in {d}/; then: mechmed ablate --config {d / 'ablation.yaml'} --out "
              f"{args.out} --collect")
        return 0
    if args.arm:
        done = run_arms(cfg, args.out, args.arm, progress=True, device=args.device, dtype=args.dtype)
        for name, m in done.items():
            after = m.get("after", m)
            print(f"{name}: flip rate {after['flip_rate']:.3f}, accuracy {after['accuracy']['original']:.3f} "
                  f"({args.out}/{'arms/' if not name.startswith('base-') else ''}{name})")
        return 0
    res = run_ablation(cfg, args.out, progress=True, workers=args.workers, device=args.device,
                       dtype=args.dtype, devices=args.devices, collect=args.collect)
    print(format_table(res.rows))
    print(f"written {args.out}/results.json, results.csv, summary.csv")
    if args.report:
        from mechmed.report import build_report

        build_report(Path(args.out), out=Path(args.out))
        print(f"report: {args.out}/report.html")
    return 0


def cmd_audit_data(args) -> int:
    from mechmed.stages import run_audit

    res = run_audit(args.data, args.out, image_root=args.image_root, model=args.model, device=args.device,
                    threshold=args.threshold, seed=args.seed)
    print(f"{args.data}: {res['n_phrasings']} phrasings of {res['n_questions']} questions in {res['n_groups']} groups")
    print(f"  always the majority answer      {res['majority_accuracy']:.3f}")
    print(f"  the group's name alone          {res['group_lookup_accuracy']:.3f}")
    print(f"  the text alone ({res['folds']}-fold lookup)  {res['text_lookup_accuracy']:.3f}")
    if res.get("model_accuracy"):
        m = res["model_accuracy"]
        print(f"  the model, with the image       {m['accuracy']:.3f}")
        print(f"  the model, with a gray image    {m['accuracy_gray_image']:.3f}")
    shown = res["balance"] if len(res["balance"]) <= 20 else [b for b in res["balance"] if b["one_answer"]][:10]
    if len(shown) < len(res["balance"]):
        print(f"  {len(res['groups_with_one_answer'])} of {res['n_groups']} groups have one answer only"
              + ("; the first of them:" if shown else ""))
    for b in shown:
        print(f"  {b['group'][:60]:<30} {b['n_questions']:>5} questions, yes {b['yes_share']:.0%}"
              + ("  (one answer only)" if b["one_answer"] else ""))
    if res["warning"]:
        log.warning("audit-data %s: %s", args.data, res["warning"])
    if args.out:
        print(f"written {args.out}")
    return 0


def cmd_report(args) -> int:
    from mechmed.figures import browser_path, export_pending
    from mechmed.report import build_report

    run_dir = Path(args.run_dir)
    if args.figures and browser_path() is None:
        export_pending(run_dir)  # says what to install, before anything is written
    res = build_report(run_dir, out=run_dir)
    extra = export_pending(run_dir) if args.figures else []
    drawn = sum(1 for f in res["figures"].values() if f.get("png"))
    print(f"report: {res['html']} (summary: {res['md']}); {drawn} of {len(res['figures'])} figures as PNG"
          + (f", {len(extra)} more figure files under {run_dir}" if extra else ""))
    return 0


#: One example per command, shown at the end of its --help (and checked to parse by the tests).
EXAMPLES = {
    "evaluate": "mechmed evaluate --model google/medgemma-4b-it --device cuda --data pairs.jsonl "
                "--image-root /data/mimic-cxr --out runs/mg/eval",
    "compare": "mechmed compare runs/mg/eval runs/mg/eval-lora --out runs/mg/compare.json",
    "sae-check": "mechmed sae-check --model google/medgemma-4b-it --device cuda "
                 "--saes 'gemma-scope-2-4b-it-res:layer_{L}_width_16k_l0_big' --out runs/mg/sae_check",
    "capture": "mechmed capture --layers 2-4 --positions last --out runs/activations",
    "attribute": "mechmed attribute --data pairs.jsonl --image-root /data/mimic-cxr --saes none --no-exact "
                 "--out runs/attribute",
    "select-layers": "mechmed select-layers --scores runs/attribute/layer_scores.json --width 5 "
                     "--train-data train_pairs.jsonl --eval-data pairs.jsonl --out runs/train.yaml",
    "train": "mechmed train --config runs/train.yaml --device cuda --bf16 --out runs/train",
    "demo-model": "mechmed demo-model build --seed 1",
    "ablate": "mechmed ablate --config ablation.yaml --device cuda --out runs/ablation --report",
    "demo": "mechmed demo --out runs/demo",
    "report": "mechmed report runs/demo --figures",
    "audit-data": "mechmed audit-data --data padchest_flips.csv --image-root /data/padchest --out audit.json",
}


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Each option's default at the end of its help (where the text does not already say it); a
    training-config option shows the config's default and, where it differs, the demo's."""

    def _get_help_string(self, action):
        text = action.help or ""
        field_name = getattr(action, "config_field", None)
        if field_name is not None:
            return text + _config_default_text(field_name)
        default = action.default
        if (not action.option_strings or "default" in text.lower() or default is None or default is False
                or default is argparse.SUPPRESS or isinstance(action, argparse._VersionAction)):
            return text
        if isinstance(default, (tuple, list)):
            default = ",".join(map(str, default))
        return f"{text} (default {default})".replace("%", "%%")


def _config_default_text(name: str) -> str:
    from dataclasses import MISSING, fields

    from mechmed.config import TrainConfig
    from mechmed.sources import train_defaults

    f = next(f for f in fields(TrainConfig) if f.name == name)
    default = f.default if f.default is not MISSING else f.default_factory()
    shown = ",".join(map(str, default)) if isinstance(default, list) else default
    text = f" (default {shown}" if shown not in (None, "", {}, []) else " (default: none"
    demo = train_defaults("demo")
    if name in demo and demo[name] != default:
        text += f"; with --model demo {demo[name]}"
    return (text + ")").replace("%", "%%")


def _add_config_options(p: argparse.ArgumentParser) -> None:
    """One option per training-config field, its help text the field's docstring and default."""
    from dataclasses import MISSING, fields

    from mechmed.config import TrainConfig, field_docs

    docs = field_docs()
    for f in fields(TrainConfig):
        if f.name in ("spectral", "provenance"):
            continue
        default = f.default if f.default is not MISSING else f.default_factory()
        flag = "--" + f.name.replace("_", "-")
        if isinstance(default, bool):
            action = p.add_argument(flag, dest=f.name, default=None, action=argparse.BooleanOptionalAction,
                                    help=docs[f.name])
        elif isinstance(default, list):
            action = p.add_argument(flag, dest=f.name, default=None, metavar="A,B,...", help=docs[f.name])
        elif "dict" in str(f.type):
            action = p.add_argument(flag, dest=f.name, default=None, metavar="NAME=DATA,...", help=docs[f.name])
        else:  # the model option takes its name: its loading options are flags of their own
            kind = str if f.name == "model" else type(default) if default is not None else (
                int if "int" in str(f.type) else str)
            action = p.add_argument(flag, dest=f.name, default=None, type=kind, help=docs[f.name])
        action.config_field = f.name


def config_from_args(args) -> dict:
    """The training-config fields given on the command line (None = not given)."""
    from dataclasses import fields

    from mechmed.config import TrainConfig
    from mechmed.sites import parse_layers

    out = {}
    for f in fields(TrainConfig):
        value = getattr(args, f.name, None)
        if value is None or f.name in ("spectral", "provenance", "model"):  # model: ModelSpec.from_args
            continue
        if f.name == "layers":
            value = parse_layers(value)
        elif isinstance(value, str) and f.name in ("target_modules", "answer_words"):
            value = [v.strip() for v in value.split(",") if v.strip()]
        elif f.name == "extra_eval":
            items = [v.strip() for v in value.split(",") if v.strip() and v.strip().lower() != "none"]
            if any("=" not in v for v in items):
                raise MechmedError(f"--extra-eval {value}: give NAME=DATA pairs, e.g. unseen=demo:unseen, or none")
            value = dict(v.split("=", 1) for v in items)
        out[f.name] = value
    return out


def cmd_train(args) -> int:
    from mechmed.config import ModelSpec, TrainConfig
    from mechmed.sources import train_defaults
    from mechmed.train import train

    given = config_from_args(args)
    if args.config:
        base = TrainConfig.load(args.config).to_dict()
        base.pop("config_version", None)
    else:
        if "layers" not in given:
            raise MechmedError("train: give --config FILE (from mechmed select-layers) or --layers, e.g. --layers 2-4")
        base = train_defaults(args.model or "demo")
    given["model"] = ModelSpec.from_args(args, base.get("model"))
    cfg = TrainConfig.from_dict({**base, **given}, source=args.config or "command line")
    from mechmed.models import cpu_threads_for
    from mechmed.runtime import torch_threads

    with torch_threads(cpu_threads_for(cfg.model.name, args.device)):  # as the ablation grid trains it
        result = train(cfg, args.out, resume=args.resume, device=args.device, dtype=args.dtype, progress=True)
    m = result.metrics
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under accelerate launch the main process reports
    print(f"trained {cfg.method} on layers {cfg.layers} ({m['trainable_parameters']} parameters, "
          f"{m['n_adapted_modules']} modules) in {m['train_seconds']:.1f} s: {args.out}/adapter")
    if m.get("collapsed"):
        print(f"WARNING: the model collapsed at step {m['collapse']['step']}: {m['collapse']['reason']}")
    if "before" in m:
        for label, key in (("before", "before"), ("after", "after")):
            print(f"{label}:")
            print_metrics(m[key])
        t = m["comparison"]["flip_rate"]["test"]
        print(f"flip rate change: z = {t['statistic']:.2f}, p = {t['p_value']:.4f}")
    return 0


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (``mechmed CMD: error: ...``) and exit code 2."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}; see {self.prog} --help\n")


def _add_verbosity(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """-v / -q, accepted before or after the command (SUPPRESS: a later parser does not reset them)."""
    g = p.add_mutually_exclusive_group()
    g.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help="log progress details")
    g.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                   help="errors and warnings only: no progress bars, no info logging")
    return p


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mechmed",
        description="Find where a medical VLM's yes/no answer flips under rewording, and fix it there.",
        formatter_class=_HelpFormatter,
        epilog="example:\n  mechmed demo                 the whole chain on the embedded default\n"
               "  mechmed COMMAND --help       a command's options, their defaults and an example")
    parser.add_argument("--version", action="version", version=f"mechmed {__version__}")
    _add_verbosity(parser)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    add_parser = sub.add_parser

    def add_command(name: str, **kw):  # -v / -q after the command too; defaults and an example in --help
        return _add_verbosity(add_parser(name, formatter_class=_HelpFormatter, epilog=f"example:\n  {EXAMPLES[name]}",
                                         **kw))

    sub.add_parser = add_command

    p = sub.add_parser("evaluate", help="paraphrase consistency of a model on a pair set (metrics.json)")
    _add_model_options(p)
    p.add_argument("--data", default="demo", help="pairs file (.jsonl/.json/.csv), directory with pairs.jsonl, hub dataset hf:OWNER/NAME[:CONFIG][@SPLIT], 'demo' "
                   "(the demo's held-out pairs) or demo:unseen / demo:negation / demo:train")
    p.add_argument("--image-root", default=None, help="resolve image paths under this directory")
    p.add_argument("--out", default="runs/eval", help="output directory (default runs/eval)")
    p.add_argument("--adapter", default=None, help="peft adapter directory to evaluate on the base model")
    p.add_argument("--batch-size", type=int, default=16, help="prompts per forward pass (default 16)")
    p.add_argument("--limit", type=int, default=None, help="evaluate only the first N pairs")
    p.add_argument("--no-controls", action="store_true", help="skip the image controls (gray image, image swap, "
                   "counterfactual image)")
    p.add_argument("--risk", type=float, default=0.05, help="error rate at which flip_risk.coverage reports the "
                   "share of canonical answers kept, most confident first (default 0.05)")
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("compare", help="statistical comparison of two evaluations (A before, B after)")
    p.add_argument("a", help="evaluation directory A (or its metrics.json)")
    p.add_argument("b", help="evaluation directory B (or its metrics.json)")
    p.add_argument("--out", default=None, help="also write the comparison as JSON here")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("sae-check", help="do SAEs reconstruct the model's activations? (R² per layer, t-test)")
    _add_model_options(p)
    p.add_argument("--saes", default="demo", help="demo, a directory of per-layer sae-lens SAEs, or "
                   "RELEASE:ID_TEMPLATE, e.g. gemma-scope-2-4b-it-res:layer_{L}_width_16k_l0_big")
    p.add_argument("--layers", default="all", help="layers to check, e.g. 15-19 or all (default)")
    p.add_argument("--texts", default=None, help="prompt sets: medical, general, images (default medical,general, "
                   "plus images for a model that ships image prompts, as the demo does)")
    p.add_argument("--threshold", type=float, default=0.95, help="R² threshold of the t-test (default 0.95)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-ce", action="store_true", help="skip CE-loss recovered (2 to 7 extra forwards per layer and batch: the splices, by token "
                   "type, and the answer position)")
    p.add_argument("--out", default="runs/sae_check")
    p.set_defaults(func=cmd_sae_check)

    p = sub.add_parser("capture", help="write a pair set's activations to disk (safetensors shards) for notebooks")
    _add_model_options(p)
    p.add_argument("--data", default="demo", help="pairs file, directory, hf:OWNER/NAME, or 'demo' (both phrasings of each pair)")
    p.add_argument("--image-root", default=None)
    p.add_argument("--layers", default="all", help="decoder layers, e.g. 15-19 or all (default)")
    p.add_argument("--kind", default="resid_post", help="resid_post (default), attn_out or mlp_out")
    p.add_argument("--positions", default="last", help="last (the answer position, default), all, text or image tokens")
    p.add_argument("--max-pairs", type=int, default=None, help="a seeded sample of the pairs (default all)")
    p.add_argument("--shard-size", type=int, default=1024, help="prompts per safetensors shard (default 1024)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--store-dtype", default=None, help="dtype of the stored activations (default the model's)")
    p.add_argument("--backend", default="hooks", help="capture backend: hooks (default), nnsight or transformer_lens")
    p.add_argument("--out", default="runs/activations", help="store directory; rerun to resume (default runs/activations)")
    p.set_defaults(func=cmd_capture)

    p = sub.add_parser("attribute", help="attribute paraphrase flips to layers and SAE features")
    _add_model_options(p)
    p.add_argument("--data", default="demo", help="pairs file, directory, hf:OWNER/NAME, or 'demo'")
    p.add_argument("--image-root", default=None)
    p.add_argument("--saes", default="demo", help="SAEs as for sae-check, or 'none' for layers only")
    p.add_argument("--split", default="train", choices=["train", "eval"],
                   help="which pairs of demo or a hub dataset: train (default; what training reads, so the layers "
                   "and features chosen here leave the held-out pairs unseen) or eval (the held-out flips)")
    p.add_argument("--max-pairs", type=int, default=300, help="pairs to attribute (a seeded sample; default 300)")
    p.add_argument("--no-exact", action="store_true", help="skip exact activation patching (L forwards per pair)")
    p.add_argument("--top-features", type=int, default=10, help="features per layer in features.csv")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="runs/attribute")
    p.set_defaults(func=cmd_attribute)

    p = sub.add_parser("select-layers", help="pick a layer range from the scores; write a training config")
    p.add_argument("--scores", default=None, help="layer_scores.json from mechmed attribute "
                   "(omit to compute it from --model/--data/--saes)")
    p.add_argument("--strategy", default="window", choices=list(STRATEGIES),
                   help="window: the width's window of largest summed score; peak_end: the window ending at the "
                   "score's peak; topk; threshold (default window; docs/selection.md compares them)")
    p.add_argument("--width", type=int, default=5, help="window width (default 5)")
    p.add_argument("--k", type=int, default=5, help="layers for --strategy topk")
    p.add_argument("--threshold", type=float, default=None, help="score threshold for --strategy threshold")
    p.add_argument("--p-best", type=float, default=0.8, metavar="P",
                   help="warn when the selection comes out in fewer than this share of the resamples of the "
                   "attributed questions (default 0.8)")
    p.add_argument("--score", default="gain_flipped", help="which layer score to select on (default gain_flipped: "
                   "where the flip enters the residual; see layer_scores.json for the others)")
    p.add_argument("--saes", default="demo", help="SAEs, when the scores are computed here")
    p.add_argument("--data", default="demo", help="pairs, when the scores are computed here; also the config's data")
    p.add_argument("--out", default="runs/train.yaml", help="training config to write")
    _add_device_options(p)  # for the attribution run when --scores is not given
    _add_config_options(p)
    p.set_defaults(func=cmd_select_layers)

    p = sub.add_parser("train", help="train an adapter on the selected layers (consistency + accuracy loss)")
    p.add_argument("--config", default=None, help="training config YAML (from mechmed select-layers); "
                   "options given here override it")
    p.add_argument("--out", default="runs/train", help="run directory (default runs/train)")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run from its last checkpoint")
    _add_device_options(p)  # under accelerate launch, the launcher's device
    _add_config_options(p)
    _add_load_options(p, config=True)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo-model", help="build (or find) the embedded default model and data")
    p.add_argument("action", choices=["build"], help="build: train it now if not cached")
    p.add_argument("--seed", type=int, default=0, help="which demo model and data to build (default 0)")
    p.add_argument("--force", action="store_true", help="rebuild even if cached")
    p.add_argument("--cache-dir", default=None, help="cache directory (default $MECHMED_CACHE or ~/.cache/mechmed)")
    p.set_defaults(func=cmd_demo_model)

    p = sub.add_parser("ablate", help="train and evaluate a grid of layer ranges, methods and seeds")
    p.add_argument("--config", required=True, help="ablation YAML: train (a training config), arms, methods, "
                   "seeds, match_parameters, workers")
    p.add_argument("--out", default="runs/ablation", help="output directory (default runs/ablation); "
                   "finished arms are reused, interrupted ones resumed")
    p.add_argument("--workers", type=int, default=None, help="arms trained in parallel (overrides the config)")
    p.add_argument("--devices", type=_words, default=None, metavar="DEV,DEV",
                   help="train the arms spread over these devices, one arm per device at a time (e.g. cuda:0,cuda:1)")
    p.add_argument("--plan", action="store_true", help="write OUT/plan/ (a training config per arm and "
                   "commands.txt, one command per run, e.g. for a job array) and run nothing")
    p.add_argument("--arm", type=_words, default=None, metavar="NAME[,NAME]",
                   help="run only these runs of the plan (base-s0, selected-lora-s0, ...)")
    p.add_argument("--collect", action="store_true", help="run nothing: write the table and statistics from "
                   "the finished runs under --out (trained here or elsewhere)")
    p.add_argument("--report", action="store_true", help="also write report.html / report.md there")
    _add_device_options(p)
    _add_load_options(p, config=True)
    p.set_defaults(func=cmd_ablate)

    p = sub.add_parser("demo", help="run the pipeline end to end on the embedded default")
    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--seed", type=int, default=0, help="seed of the demo model, data and training (default 0)")
    p.add_argument("--width", type=int, default=3, help="width of the selected layer window (default 3)")
    p.add_argument("--workers", type=int, default=2, help="ablation arms trained in parallel (default 2)")
    p.add_argument("--methods", type=_words, default=("lora",), help="adapter methods to ablate: lora, "
                   "spectral_moe, or both comma-separated (default lora)")
    p.add_argument("--arms", type=_words, default=DEMO_ARMS, help="ablation arms, comma-separated (default "
                   f"{','.join(DEMO_ARMS)}; also middle, random)")
    p.add_argument("--max-pairs", type=int, default=200, help="pairs to attribute (default 200)")
    p.add_argument("--audit", type=int, nargs="?", const=8, default=None, metavar="N",
                   help="also run the selection audit: train every window of the width, N random layer sets (default "
                   "8) and all layers at matched parameters, and report whether the selected window is where "
                   "training helps (about 4.5 minutes more on 2 cores)")
    _add_device_options(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("audit-data", help="how much of a pair set's answers the text alone gives (balance, "
                       "text-only lookup; with --model, the model's accuracy with gray images)")
    p.add_argument("--data", default="demo", help="pairs file (.jsonl/.json/.csv), directory with pairs.jsonl, hub "
                   "dataset hf:OWNER/NAME[:CONFIG][@SPLIT], or 'demo' (default)")
    p.add_argument("--image-root", default=None, help="resolve image paths under this directory")
    p.add_argument("--model", default=None, help="also measure this model's accuracy with the image and with a "
                   "gray image (default: the data only)")
    p.add_argument("--threshold", type=float, default=None, help="warn when a text-only lookup answers more than "
                   "this share of the phrasings (default 0.8)")
    p.add_argument("--seed", type=int, default=0, help="seed of the folds (and of the demo data)")
    p.add_argument("--out", default=None, help="write the audit to this JSON file")
    _add_device_options(p)
    p.set_defaults(func=cmd_audit_data)

    p = sub.add_parser("report", help="write report.html / report.md again from a finished run directory")
    p.add_argument("run_dir", metavar="RUN_DIR", help="the --out of mechmed demo or mechmed ablate")
    p.add_argument("--figures", action="store_true", help="also draw every figure that was written as HTML "
                   "only (no browser then) as PNG, and the report's as SVG and PDF; needs Chrome/Chromium")
    p.set_defaults(func=cmd_report)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help, --version, or a usage error (already printed, one line)
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    verbose, quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
    if verbose and quiet:
        print("mechmed: error: -v and -q together; choose one", file=sys.stderr)
        return EXIT_USAGE
    if quiet:
        os.environ["MECHMED_PROGRESS"] = "0"
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    from contextlib import nullcontext

    from mechmed.io import rollback_on_error

    out = getattr(args, "out", None)
    # a failed command leaves --out as it found it; resumable grids keep their finished stages
    guard = rollback_on_error(out) if out and args.command not in ROLLBACK_EXEMPT else nullcontext()
    from mechmed.models import cpu_threads_for
    from mechmed.runtime import check_device, deterministic, torch_threads, warn_if_not_deterministic

    model = model_of(args)
    try:
        if getattr(args, "device", None):  # before any data or weights: a device that is not there is one line
            args.device = check_device(args.device)  # and auto is CUDA where present
        warn_if_not_deterministic(model)
        if getattr(args, "gguf_file", None):
            from mechmed.checkpoints import gguf_path

            args.model = gguf_path(args.model, args.gguf_file, revision=args.revision, cache_dir=args.cache_dir,
                                   local_files_only=args.local_files_only)
        if getattr(args, "prompt_template", None) is not None:
            from mechmed.readout import check_template

            check_template(args.prompt_template)
        threads = cpu_threads_for(str(model), getattr(args, "device", "cpu")) if model else None
        with guard, torch_threads(threads), deterministic(getattr(args, "device", None) or "cpu"):
            return int(args.func(args) or 0)
    except MechmedError as e:
        print(f"mechmed {args.command}: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def model_of(args) -> str | None:
    """The model a parsed command line loads: ``--model``, the ``model`` of its ``--config`` (a training
    config, or an ablation config's ``train``), ``demo`` for the demo commands; None for commands
    that load none. Reads no weights and imports no torch."""
    if args.command in ("demo", "demo-model"):
        return "demo"
    given = getattr(args, "model", None)
    if given or not getattr(args, "config", None):
        return given or ("demo" if args.command == "train" else None)
    import yaml

    try:
        raw = yaml.safe_load(Path(args.config).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None  # the command reports what is wrong with its config
    raw = raw.get("train", raw) if isinstance(raw, dict) else {}
    model = raw.get("model", "demo") if isinstance(raw, dict) else None
    return model.get("name") if isinstance(model, dict) else model


def requested_model(argv: Sequence[str]) -> str | None:
    """:func:`model_of` for a raw command line, or None when it does not parse (``main`` then says why)."""
    import contextlib
    import io

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = build_parser().parse_args(argv)
    except SystemExit:
        return None
    return model_of(args) if getattr(args, "func", None) else None


def entry() -> None:
    from mechmed.runtime import reexec_deterministic

    reexec_deterministic(requested_model(sys.argv[1:]))  # before torch loads: it reads the settings once
    sys.exit(main())


if __name__ == "__main__":
    entry()
