"""Wall time of ``mechmed demo`` end to end, cold (nothing cached) and warm (model, data and SAEs cached).

Usage: ``python benchmarks/demo_e2e.py [--runs cold warm] [--modes deterministic default] [--keep DIR]
[--out benchmarks/results/demo_e2e.json] [-- EXTRA DEMO OPTIONS]``

Cold runs the command with ``MECHMED_CACHE`` pointing at a new, empty directory, so the demo model,
its data and its SAEs are built on the way; warm runs it again on that cache into a fresh output
directory (every stage of the run itself is redone). ``--modes`` runs both once per CPU mode
(``MECHMED_DETERMINISTIC=1`` / ``0``, each with its own cache), so that the deterministic mode's cost is
a ratio of one run; ``--keep DIR`` keeps each run's output directory (``DIR/{mode}-{run}``), e.g. to
compare a cold run's numbers with docs/demo.md. Each run is the real CLI in a subprocess. Prints
a table (total seconds, seconds per stage as the command reports them, CPU seconds, load average)
and writes the rows, the machine and the bars to JSON. Bars, on 2 CPU cores: cold ≤ 240 s, warm ≤ 120 s.
The machine's load average is recorded before and after each run: on a shared machine a high load
inflates wall time while CPU seconds stay put.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BARS = {"cold": 240.0, "warm": 120.0}
STAGES = ("model", "sae_check", "attribute", "select_layers", "ablation", "report")


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def run_demo(out: Path, cache: Path, extra: list[str], mode: str = "deterministic") -> dict:
    """One ``mechmed demo`` run in CPU ``mode``; its wall time, CPU time (its whole process tree) and
    stage times."""
    env = {**os.environ, "MECHMED_CACHE": str(cache), "MECHMED_PROGRESS": "0", "PYTHONUNBUFFERED": "1",
           "MECHMED_DETERMINISTIC": "1" if mode == "deterministic" else "0"}
    cmd = [sys.executable, "-m", "mechmed.cli", "demo", "--out", str(out), *extra]
    load_before = os.getloadavg()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-3000:] + proc.stderr[-3000:])
        raise SystemExit(f"mechmed demo failed (exit {proc.returncode})")
    stages = {}
    for name in STAGES:
        m = re.search(rf"^\[{name}\] done in ([0-9.]+) s", proc.stdout, re.M)
        stages[name] = float(m.group(1)) if m else None
    return {
        "wall_s": round(wall, 1),
        "cpu_s": round(usage1.ru_utime + usage1.ru_stime - usage0.ru_utime - usage0.ru_stime, 1),
        "stages_s": stages,
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "uptime_after": _uptime(),
        "command": " ".join(["mechmed", *cmd[3:]]),
        "stdout": proc.stdout,
    }


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", nargs="+", choices=["cold", "warm"], default=["cold", "warm"])
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="cache directory for the runs (default: a new temporary one, removed afterwards); "
                         "a warm-only run needs one that is filled")
    ap.add_argument("--modes", nargs="+", choices=["deterministic", "default"], default=["deterministic"],
                    help="CPU modes to run, each cold then warm in its own cache (default: deterministic, the "
                         "embedded default's)")
    ap.add_argument("--keep", type=Path, default=None, help="keep each run's output directory under this one")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "demo_e2e.json")
    args = ap.parse_args(argv)

    import torch

    from mechmed import __version__

    caches = {m: (args.cache_dir / m if args.cache_dir and len(args.modes) > 1 else args.cache_dir)
              or Path(tempfile.mkdtemp(prefix=f"mechmed-e2e-cache-{m}-")) for m in args.modes}
    work = args.keep or Path(tempfile.mkdtemp(prefix="mechmed-e2e-runs-"))
    rows = []
    try:
        for mode in args.modes:
            for kind in args.runs:
                print(f"{kind}, {mode} mode: mechmed demo (cache {caches[mode]}) ...", flush=True)
                row = {"run": kind, "mode": mode, **run_demo(work / f"{mode}-{kind}", caches[mode], extra, mode)}
                row["bar_s"] = BARS[kind]
                row["passes"] = row["wall_s"] <= BARS[kind]
                rows.append(row)
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
        if args.cache_dir is None:
            for cache in caches.values():
                shutil.rmtree(cache, ignore_errors=True)

    cols = "  ".join(f"{s:>9}" for s in ("model", "sae", "attribute", "ablation", "report"))
    header = f"{'run':<5} {'mode':<13} {'wall s':>7} {'bar':>5} {'cpu s':>7}  {cols}  {'load (1/5/15 min) before → after':<34}"
    print(header)
    print("-" * len(header))
    for r in rows:
        st = r["stages_s"]
        cells = "  ".join(f"{st[s]:>9.1f}" if st[s] is not None else f"{'-':>9}"
                          for s in ("model", "sae_check", "attribute", "ablation", "report"))
        load = f"{'/'.join(f'{x:.1f}' for x in r['loadavg_before'])} → {'/'.join(f'{x:.1f}' for x in r['loadavg_after'])}"
        mark = "ok" if r["passes"] else "OVER"
        print(f"{r['run']:<5} {r['mode']:<13} {r['wall_s']:>7.1f} {r['bar_s']:>5.0f} {r['cpu_s']:>7.1f}  {cells}  {load:<34} {mark}")
    result = {
        "benchmark": "demo_e2e",
        "when": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "demo_options": extra,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "mechmed": __version__,
            "chromium": shutil.which("chromium") is not None,
        },
        "bars_s": BARS,
        "rows": [{k: v for k, v in r.items() if k != "stdout"} for r in rows],
        "output": {f"{r['mode']}-{r['run']}": r["stdout"].splitlines() for r in rows},
        "all_pass": all(r["passes"] for r in rows),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, args.out)
    print(f"wrote {args.out}")
    return 0 if result["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
