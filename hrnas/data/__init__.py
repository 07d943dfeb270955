"""Data for hrnas: the embedded Fashion-MNIST subset, dense tasks derived from its pixels,
loaders for real datasets in their native layouts, and small joint transforms.

``build_dataset(name, split, **options)`` is the one entry point the CLI uses; ``DATASETS`` lists
the names. Every dataset returns sample dicts of tensors and carries ``task`` ("cls", "seg" or
"kpt"), ``in_channels`` and ``num_classes`` or ``num_keypoints``.
"""

from __future__ import annotations

import inspect
from pathlib import Path

from .coco import COCO_FLIP_PAIRS, CocoKeypoints
from .fashion import FashionClassification, FashionKeypoints, FashionSegmentation
from .fashion_mnist import load_fashion_mnist
from .folder import ImageFolder
from .segmentation import ADE20K, Cityscapes

DATASETS = {
    "fashion-cls": FashionClassification,
    "fashion-seg": FashionSegmentation,
    "fashion-kpt": FashionKeypoints,
    "imagefolder": ImageFolder,
    "cityscapes": Cityscapes,
    "ade20k": ADE20K,
    "coco-kpt": CocoKeypoints,
}


def _parameters(cls) -> set[str]:
    names = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = inspect.signature(init).parameters.values()
        names |= {p.name for p in params if p.kind is p.POSITIONAL_OR_KEYWORD and p.name != "self"}
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return names


def build_dataset(name: str, split: str, **options):
    """The dataset ``name`` (a key of ``DATASETS``) for ``split``.

    The Fashion-MNIST tasks take split "train"/"test"; "imagefolder" reads ``root/<split>``;
    the others pass ``split`` to their loader. An unknown name or option raises ValueError
    naming it and the valid choices.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {sorted(DATASETS)}")
    cls = DATASETS[name]
    allowed = _parameters(cls) - {"split"}
    if name == "imagefolder":
        allowed = {"root", "transform"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(
            f"dataset {name!r} has no option {', '.join(map(repr, unknown))}; "
            f"its options are {sorted(allowed)}"
        )
    if name == "imagefolder":
        if "root" not in options:
            raise ValueError("dataset 'imagefolder' needs root= (the folder holding <split>/)")
        return ImageFolder(Path(options["root"]) / split, options.get("transform"))
    return cls(split=split, **options)


__all__ = [
    "ADE20K",
    "COCO_FLIP_PAIRS",
    "Cityscapes",
    "CocoKeypoints",
    "DATASETS",
    "FashionClassification",
    "FashionKeypoints",
    "FashionSegmentation",
    "ImageFolder",
    "build_dataset",
    "load_fashion_mnist",
]
