"""Paraphrase data: the :class:`ParaphrasePair` record and its readers and writer.

``load_pairs`` reads JSON lines / CSV files, ``load_psf_med`` the PSF-Med benchmark (hub or local
files in its layout), ``load_hub_pairs`` any hub dataset of pairs (``--data hf:OWNER/NAME``), ``write_pairs`` writes JSON lines that ``load_pairs`` reads back.
"""

from mechmed.data.loaders import ALIASES, load_hub_pairs, load_pairs, load_psf_med, write_pairs
from mechmed.data.records import ParaphrasePair

__all__ = ["ALIASES", "ParaphrasePair", "load_hub_pairs", "load_pairs", "load_psf_med", "write_pairs"]
