"""Which selection criterion to trust: chosen on demo seeds 0–2, confirmed on seeds 3–4 and on a real model.

Reads the selection audits of ``mechmed demo --seed S --audit`` (``analyses/demo_seeds.py --audit``) and,
when given, of ``analyses/real_gemma.py --audit N``, and compares the window criteria of
:data:`mechmed.selection_audit.CRITERIA` (and all layers at matched parameters) by their regret: the best
window's flip-rate reduction minus the criterion's window's.

The rule, fixed before the confirming data are read:

1. on the choosing seeds (0–2), the attribution criterion with the lowest mean regret is the candidate
   (layer index alone, ``earliest``, and the all-layer sets are baselines, not candidates); a tie with
   select-layers' default (``gain_flipped``) keeps the default, other ties go to the first in
   :data:`mechmed.selection_audit.CRITERIA`;
2. it becomes the default only if its mean regret is also below the default's on the confirming seeds
   (3–4) and not above it on the real model;
3. and only if it does better than layer index alone (``earliest``: a lower regret) on the confirming
   seeds or on the real model: a criterion that only matches the first layers is no reason to read the
   attribution (with 2, a tie with layer index keeps the default);
4. the report says, for the candidate, whether its regret is below that of layer index alone and of all
   layers at matched parameters, on each group.

Writes ``selection_audit.json`` and ``selection_audit.md`` under ``--out``.

    python analyses/selection_audit.py --runs runs/demo-seeds --real runs/analyses/real_gemma_audit
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DEFAULT = "gain_flipped"
#: Compared, never adopted: layer index alone and the all-layer sets.
BASELINES = ("earliest", "all_matched", "all_samerank")


def group(dirs: list[Path]) -> dict:
    from mechmed.ablate import pool_audits

    return pool_audits([d / "ablation" for d in dirs])["pooled"]


def real_audit(path: Path | None) -> dict | None:
    if path is None:
        return None
    f = path / "audit" / "results.json"
    if not f.is_file():
        sys.exit(f"selection_audit.py: --real {path}: no audit/results.json (run analyses/real_gemma.py --audit N)")
    return json.loads(f.read_text(encoding="utf-8"))["audit"]["pooled"]


def decide(choose: dict, confirm: dict, real: dict | None) -> dict:
    """The rule of the module doc, applied in order."""
    crit = choose["criteria"]
    windows = {k: v for k, v in crit.items() if k not in BASELINES}
    best = min(windows, key=lambda k: (windows[k]["regret"], k != DEFAULT))  # min keeps the first of equals
    out = {"candidate": best, "default": DEFAULT,
           "beats_layer_index": {name: g["criteria"][best]["regret"] < g["criteria"]["earliest"]["regret"]
                                 for name, g in (("choose", choose), ("confirm", confirm), ("real", real))
                                 if g and best in g["criteria"]},
           "beats_all_matched": {name: g["criteria"][best]["regret"] < g["criteria"]["all_matched"]["regret"]
                                 for name, g in (("choose", choose), ("confirm", confirm), ("real", real))
                                 if g and best in g["criteria"] and "all_matched" in g["criteria"]}}
    if best == DEFAULT or windows[best]["regret"] >= windows[DEFAULT]["regret"]:
        out.update(new_default=DEFAULT, reason="no criterion had a lower regret than the default on seeds 0–2")
        return out
    c_ok = (best in confirm["criteria"]
            and confirm["criteria"][best]["regret"] < confirm["criteria"][DEFAULT]["regret"])
    r_ok = real is None or (best in real["criteria"] and DEFAULT in real["criteria"]
                            and real["criteria"][best]["regret"] <= real["criteria"][DEFAULT]["regret"])
    out["confirmed_on_seeds"] = c_ok
    out["confirmed_on_real"] = None if real is None else r_ok
    i_ok = any(v for k, v in out["beats_layer_index"].items() if k != "choose")
    out["beats_layer_index_confirmed"] = i_ok
    out["new_default"] = best if c_ok and r_ok and i_ok and real is not None else DEFAULT
    if out["new_default"] == best:
        out["reason"] = "confirmed on seeds 3–4 and the real model, and better than layer index alone"
    elif not (c_ok and r_ok):
        out["reason"] = "not confirmed: " + ", ".join(w for w, ok in (("seeds 3–4", c_ok), ("the real model", r_ok))
                                                      if not ok)
    elif not i_ok:
        out["reason"] = ("confirmed against the default, but no better than layer index alone on the confirming "
                         "seeds or the real model")
    else:
        out["reason"] = "no real-model audit to confirm it on"
    return out


def table(name: str, pooled: dict) -> list[str]:
    from mechmed.figures import layer_text

    lines = [f"### {name}", "", "| criterion | windows | regret per unit | mean regret [95% CI] | Spearman ρ of its score |",
             "|---|---|---|---|---|"]
    for k, c in sorted(pooled["criteria"].items(), key=lambda kv: kv[1]["regret"]):
        rho = pooled["spearman"].get({"earliest": "layer_index"}.get(k, k))
        lines.append(f"| {k} | {', '.join(layer_text(w) for w in c['windows'])} | "
                     f"{', '.join(f'{x:+.3f}' for x in c['per_unit'])} | {c['regret']:+.3f} "
                     f"[{c['regret_ci'][0]:+.3f}, {c['regret_ci'][1]:+.3f}] | "
                     + (f"{rho['rho']:+.2f} [{rho['ci'][0]:+.2f}, {rho['ci'][1]:+.2f}]" if rho else "–") + " |")
    return lines + ["", pooled["verdict"], ""]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--runs", type=Path, default=Path("runs/demo-seeds"), help="seed-S directories of the demo")
    ap.add_argument("--choose", type=int, nargs="+", default=[0, 1, 2], help="seeds the criterion is chosen on")
    ap.add_argument("--confirm", type=int, nargs="+", default=[3, 4], help="seeds that confirm it")
    ap.add_argument("--real", type=Path, default=None, help="the --out of analyses/real_gemma.py --audit N")
    ap.add_argument("--out", type=Path, default=Path("runs/analyses/selection_audit"))
    args = ap.parse_args(argv)

    choose = group([args.runs / f"seed-{s}" for s in args.choose])
    confirm = group([args.runs / f"seed-{s}" for s in args.confirm])
    every = group([args.runs / f"seed-{s}" for s in [*args.choose, *args.confirm]])
    real = real_audit(args.real)
    decision = decide(choose, confirm, real)
    md = [*table(f"Choosing: seeds {', '.join(map(str, args.choose))}", choose),
          *table(f"Confirming: seeds {', '.join(map(str, args.confirm))}", confirm),
          *table("All demo seeds", every)]
    if real is not None:
        md += table("Real model (analyses/real_gemma.py --audit)", real)
    md += [f"Decision: the default stays `{decision['new_default']}`" if decision["new_default"] == DEFAULT else
           f"Decision: the default becomes `{decision['new_default']}`", f"({decision['reason']}; candidate on the "
           f"choosing seeds: `{decision['candidate']}`).",
           "Does it beat layer index alone (`earliest`)? " + ", ".join(
               f"{k}: {'yes' if v else 'no'}" for k, v in decision["beats_layer_index"].items())
           + ". Does it beat all layers at matched parameters? " + ", ".join(
               f"{k}: {'yes' if v else 'no'}" for k, v in decision["beats_all_matched"].items()) + ".", ""]
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"choose": choose, "confirm": confirm, "all_seeds": every, "real": real, "decision": decision}
    (args.out / "selection_audit.json").write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
    (args.out / "selection_audit.md").write_text("\n".join(md), encoding="utf-8")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
