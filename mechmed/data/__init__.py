"""Paraphrase data: the :class:`ParaphrasePair` record and its readers and writer.

``load_pairs`` reads JSON lines / CSV files, ``load_psf_med`` the PSF-Med benchmark (hub or local
files in its layout), ``write_pairs`` writes JSON lines that ``load_pairs`` reads back.
"""

from mechmed.data.loaders import ALIASES, load_pairs, load_psf_med, write_pairs
from mechmed.data.records import ParaphrasePair

__all__ = ["ALIASES", "ParaphrasePair", "load_pairs", "load_psf_med", "write_pairs"]
