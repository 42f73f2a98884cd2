"""mechmed: mechanistic interpretability of medical vision-language models.

Importing the package is cheap; heavy libraries (torch, transformers, ...) load inside the
functions that need them, so ``mechmed --help`` answers at once.
"""

__version__ = "0.9.0"

from mechmed.errors import MechmedError  # noqa: E402
from mechmed.sites import Site  # noqa: E402

__all__ = ["MechmedError", "Site", "__version__"]
