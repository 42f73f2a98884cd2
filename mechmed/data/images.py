"""The one image loader: a path (optionally under an image root) to an RGB PIL image, with a one-line
error that names the file when it is missing or unreadable."""

from __future__ import annotations

import os
from pathlib import Path

from mechmed.errors import MechmedError


def load_image(path: str | os.PathLike, image_root: str | os.PathLike | None = None):
    """``path`` (under ``image_root`` when relative and a root is given) as an RGB ``PIL.Image``."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    if image_root is not None and not p.is_absolute():
        p = Path(image_root) / p
    try:
        with Image.open(p) as im:
            return im.convert("RGB")
    except FileNotFoundError:
        raise MechmedError(f"image {p}: not found; check the image path or --image-root") from None
    except (UnidentifiedImageError, OSError) as e:
        raise MechmedError(f"image {p}: cannot be read ({e}); replace the file") from None
