"""The one progress helper: a tqdm bar on stderr when a description is given and the output is a
terminal (or ``MECHMED_PROGRESS=1``); silent otherwise. ``MECHMED_PROGRESS=0`` silences it."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable


def progress_bar(iterable: Iterable, desc: str | None = None, total: int | None = None):
    flag = os.environ.get("MECHMED_PROGRESS")
    show = desc is not None and (flag == "1" or (flag != "0" and sys.stderr.isatty()))
    if not show:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, total=total, leave=False, file=sys.stderr)
