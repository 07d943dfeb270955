"""Segmentation datasets in their native layouts: Cityscapes and ADE20K (SceneParsing 2016).

Both return ``{"image": [3, H, W] float, "mask": [H, W] int64}`` with ``IGNORE_INDEX`` (255) on
unlabelled pixels; ``transform`` acts on the NumPy sample (see ``hrnas.data.transforms``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from ._io import check_pairs, read_image, read_label, require_dir
from .transforms import apply

IGNORE_INDEX = 255

# Cityscapes labelId -> trainId for the 19 evaluated classes (the `labels` table of
# cityscapesScripts, helpers/labels.py); every other id (void, parking, rail track, guard rail,
# bridge, tunnel, polegroup, caravan, trailer, license plate) is ignored.
CITYSCAPES_TRAIN_IDS = {
    7: 0,  # road
    8: 1,  # sidewalk
    11: 2,  # building
    12: 3,  # wall
    13: 4,  # fence
    17: 5,  # pole
    19: 6,  # traffic light
    20: 7,  # traffic sign
    21: 8,  # vegetation
    22: 9,  # terrain
    23: 10,  # sky
    24: 11,  # person
    25: 12,  # rider
    26: 13,  # car
    27: 14,  # truck
    28: 15,  # bus
    31: 16,  # train
    32: 17,  # motorcycle
    33: 18,  # bicycle
}
CITYSCAPES_LUT = np.full(256, IGNORE_INDEX, np.uint8)
for _label_id, _train_id in CITYSCAPES_TRAIN_IDS.items():
    CITYSCAPES_LUT[_label_id] = _train_id


def reduce_zero_label(label: np.ndarray) -> np.ndarray:
    """ADE20K's shift (mmseg ``reduce_zero_label``): 0 ("other") -> 255, c -> c - 1, and 255
    stays ignored."""
    out = label.astype(np.int16) - 1
    out[label == 0] = IGNORE_INDEX
    out[label == IGNORE_INDEX] = IGNORE_INDEX
    return out.astype(np.uint8)


class _PairedSegmentation(torch.utils.data.Dataset):
    task = "seg"
    in_channels = 3
    ignore_index = IGNORE_INDEX

    def __init__(
        self,
        pairs: list[tuple[Path, Path]],
        convert: Callable[[np.ndarray], np.ndarray],
        transform: Callable | None,
    ):
        self.pairs = pairs
        self.convert = convert
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> dict:
        image_path, label_path = self.pairs[i]
        image, label = read_image(image_path), read_label(label_path)
        if image.shape[:2] != label.shape:
            raise ValueError(
                f"{image_path} is {image.shape[:2]} but its label {label_path} is {label.shape}"
            )
        return apply(self.transform, {"image": image, "mask": self.convert(label)})


class Cityscapes(_PairedSegmentation):
    """Cityscapes fine annotations: ``root/leftImg8bit/<split>/<city>/<name>_leftImg8bit.png``
    with ``root/gtFine/<split>/<city>/<name>_gtFine_labelIds.png``; labelIds become the 19
    trainIds (``CITYSCAPES_TRAIN_IDS``), all other ids 255."""

    num_classes = 19
    splits = ("train", "val", "test")

    def __init__(self, root: str | Path, split: str = "train", transform: Callable | None = None):
        if split not in self.splits:
            raise ValueError(f"Cityscapes split must be one of {self.splits}, got {split!r}")
        root = Path(root)
        image_dir = require_dir(root / "leftImg8bit" / split, "Cityscapes images")
        label_dir = require_dir(root / "gtFine" / split, "Cityscapes labels")
        images = sorted(image_dir.glob("*/*_leftImg8bit.png"))
        if not images:
            raise ValueError(f"Cityscapes: no <city>/*_leftImg8bit.png under {image_dir}")

        def label_of(image: Path) -> Path:
            stem = image.name[: -len("_leftImg8bit.png")]
            return label_dir / image.parent.name / f"{stem}_gtFine_labelIds.png"

        pairs = check_pairs(images, label_of, "Cityscapes")
        super().__init__(pairs, CITYSCAPES_LUT.__getitem__, transform)


class ADE20K(_PairedSegmentation):
    """ADE20K SceneParsing: ``ADEChallengeData2016/images/<split>/<name>.jpg`` with
    ``ADEChallengeData2016/annotations/<split>/<name>.png`` (``root`` is that folder or its
    parent); split "training"/"validation" (or "train"/"val"). The 150 classes are stored as
    1..150 with 0 = other, shifted by ``reduce_zero_label``."""

    num_classes = 150
    splits = {
        "train": "training",
        "val": "validation",
        "training": "training",
        "validation": "validation",
    }

    def __init__(
        self, root: str | Path, split: str = "training", transform: Callable | None = None
    ):
        if split not in self.splits:
            raise ValueError(f"ADE20K split must be one of {sorted(self.splits)}, got {split!r}")
        split = self.splits[split]
        root = Path(root)
        if (root / "ADEChallengeData2016").is_dir():
            root = root / "ADEChallengeData2016"
        image_dir = require_dir(root / "images" / split, "ADE20K images")
        label_dir = require_dir(root / "annotations" / split, "ADE20K annotations")
        images = sorted(image_dir.glob("*.jpg"))
        if not images:
            raise ValueError(f"ADE20K: no *.jpg under {image_dir}")
        pairs = check_pairs(images, lambda p: label_dir / f"{p.stem}.png", "ADE20K")
        super().__init__(pairs, reduce_zero_label, transform)
