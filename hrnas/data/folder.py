"""Image-folder classification: ``root/<class name>/<image>``, classes in sorted name order."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ._io import read_image, require_dir
from .transforms import apply

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp")


class ImageFolder(torch.utils.data.Dataset):
    """``{"image": [3, H, W] float, "label": int64}`` from class subfolders of ``root``.

    Class ``i`` is the i-th subfolder in sorted order; files with other extensions are ignored.
    ``transform`` acts on the NumPy sample (see ``hrnas.data.transforms``).
    """

    task = "cls"
    in_channels = 3

    def __init__(self, root: str | Path, transform: Callable | None = None):
        root = require_dir(Path(root), "image folder")
        self.classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if not self.classes:
            raise ValueError(f"image folder {root} has no class subfolders")
        self.samples = []
        for index, name in enumerate(self.classes):
            files = sorted(
                p for p in (root / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS
            )
            if not files:
                raise ValueError(
                    f"image folder {root}: class folder {name!r} holds no image "
                    f"({', '.join(IMAGE_EXTENSIONS)})"
                )
            self.samples.extend((f, index) for f in files)
        self.num_classes = len(self.classes)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        path, label = self.samples[i]
        return apply(self.transform, {"image": read_image(path), "label": label})
