"""``python -m mechmed``: the command line (what the deterministic mode restarts into)."""

from mechmed.cli import entry

entry()
