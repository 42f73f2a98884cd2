"""Run every notebook top to bottom on the embedded default and commit it with its outputs.

    python notebooks/regenerate.py            # all three, in place
    python notebooks/regenerate.py --check    # run them and say which committed outputs are stale

Each notebook runs in a kernel whose working directory is a temporary folder (nothing is written in
the repository), in mechmed's deterministic CPU mode, with plotly drawing every figure twice: as the
interactive figure (Jupyter, VS Code) and as a PNG beside it, which is what a forge that renders
notebooks without JavaScript shows. A PNG needs Chrome/Chromium (``plotly_get_chrome``).

The notebook's metadata records the SHA-256 of its code cells (``mechmed.code_sha256``): the tests
check it against the committed code, so code edited without regenerating is caught.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
NAMES = ("01_capture_and_sae_check", "02_paraphrase_attribution", "03_select_train_ablate")
#: Both the interactive figure and its PNG in each figure's output.
RENDERER = "plotly_mimetype+png"
#: Metadata a rerun changes without the notebook changing (timings, kernel versions).
VOLATILE_CELL_METADATA = ("execution",)


def code_sha256(nb) -> str:
    """SHA-256 over the notebook's code cells, in order."""
    h = hashlib.sha256()
    for cell in nb.cells:
        if cell.cell_type == "code":
            h.update(cell.source.encode())
            h.update(b"\0")
    return h.hexdigest()


def kernel_env(renderer: str = RENDERER) -> dict:
    """The environment a notebook kernel gets: deterministic CPU mode and plotly's renderer."""
    from mechmed.runtime import deterministic_env

    # tqdm's "IProgress not found" (no ipywidgets) is about the kernel, not the notebook
    quiet = ",".join(w for w in (os.environ.get("PYTHONWARNINGS"), "ignore:IProgress not found") if w)
    return {**deterministic_env(dict(os.environ)), "PLOTLY_RENDERER": renderer, "MECHMED_PROGRESS": "0",
            "PYTHONWARNINGS": quiet}


def run(name: str, workdir: str | os.PathLike, renderer: str = RENDERER):
    """Execute notebook ``name`` (as committed, outputs cleared) in ``workdir`` with plotly's
    ``renderer``; returns the notebook."""
    import nbformat
    from nbclient import NotebookClient

    nb = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    before = dict(os.environ)
    os.environ.update(kernel_env(renderer))  # the kernel inherits this process's environment
    try:
        NotebookClient(nb, timeout=900, kernel_name="python3",
                       resources={"metadata": {"path": str(workdir)}}).execute()
    finally:
        os.environ.clear()
        os.environ.update(before)
    for cell in nb.cells:
        for key in VOLATILE_CELL_METADATA:
            cell.metadata.pop(key, None)
    nb.metadata["mechmed"] = {"code_sha256": code_sha256(nb), "regenerate": "python notebooks/regenerate.py"}
    return nb


def main(argv=None) -> int:
    import nbformat

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=NAMES, help="notebooks to run (default: all)")
    p.add_argument("--check", action="store_true", help="write nothing; exit 1 if a committed notebook's "
                   "code differs from the code its outputs came from")
    args = p.parse_args(argv)
    from mechmed.figures import browser_path

    if browser_path() is None and not args.check:
        print("regenerate: no Chrome/Chromium for the figures' PNGs; install one with plotly_get_chrome",
              file=sys.stderr)
        return 2
    stale = []
    for name in args.names:
        committed = nbformat.read(HERE / f"{name}.ipynb", as_version=4)
        if args.check:
            if committed.metadata.get("mechmed", {}).get("code_sha256") != code_sha256(committed):
                stale.append(name)
            continue
        with tempfile.TemporaryDirectory() as tmp:
            nb = run(name, tmp)
        nbformat.validate(nb)
        nbformat.write(nb, HERE / f"{name}.ipynb")
        print(f"{name}.ipynb: {sum(len(c.outputs) for c in nb.cells if c.cell_type == 'code')} outputs written")
    if stale:
        print(f"stale outputs: {', '.join(stale)}; run python notebooks/regenerate.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
