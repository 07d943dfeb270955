"""Reading image and label files (Pillow), and path checks that name what is missing."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _pil():
    try:
        from PIL import Image
    except ImportError as error:
        raise ImportError(
            "reading image files needs Pillow: pip install 'hrnas[data]' (or pillow)"
        ) from error
    return Image


def read_image(path: str | Path) -> np.ndarray:
    """An image file as ``[H, W, 3]`` uint8 RGB."""
    with _pil().open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.uint8).copy()


def read_label(path: str | Path) -> np.ndarray:
    """A label PNG (8-bit grey or palette indices) as ``[H, W]`` uint8 of the stored values."""
    with _pil().open(path) as im:
        if im.mode not in ("L", "P"):
            raise ValueError(f"{path}: label image mode {im.mode!r}, expected 8-bit 'L' or 'P'")
        return np.asarray(im, dtype=np.uint8).copy()


def require_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise FileNotFoundError(f"{what}: directory not found: {path}")
    return path


def check_pairs(images: list[Path], partner, what: str) -> list[tuple[Path, Path]]:
    """Pair each image with ``partner(image)``; an error names the first missing partner."""
    pairs = []
    for image in images:
        other = partner(image)
        if not other.is_file():
            raise FileNotFoundError(f"{what}: label file for {image} not found: {other}")
        pairs.append((image, other))
    return pairs
