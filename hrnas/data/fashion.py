"""The embedded tasks as datasets: Fashion-MNIST classification, and segmentation / keypoints on
canvases of real Fashion-MNIST items (``hrnas.data.canvas``; labels derived from the pixels).

Every dataset here holds its whole split in memory as uint8 arrays. ``ds[i]`` gives one sample
dict of tensors (through ``transform`` when one is set); ``ds.batch(index)`` gives a whole batch
at once without a DataLoader, which is what a search loop on 2 cores wants.
Images are float32 in ``[0, 1]``, one channel.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from .canvas import NUM_KEYPOINTS, make_canvases
from .fashion_mnist import CLASSES, DEBIAN_ROOT, load_fashion_mnist
from .heatmaps import with_heatmap_targets
from .transforms import apply

# Canvas seeds get the split as a second word, so train and test draw different layouts.
_SPLIT_CODE = {"train": 0, "test": 1}


def _as_index(index) -> torch.Tensor:
    return torch.as_tensor(index, dtype=torch.long).reshape(-1)


class _InMemory(torch.utils.data.Dataset):
    in_channels = 1

    def __init__(self, arrays: dict[str, np.ndarray], transform: Callable | None):
        self.arrays = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in arrays.items()}
        self.transform = transform

    def __len__(self) -> int:
        return len(self.arrays["image"])

    def batch(self, index) -> dict[str, torch.Tensor]:
        """The samples at ``index`` (ints or a tensor) stacked, without transforms."""
        return self._convert({k: v[_as_index(index)] for k, v in self.arrays.items()})

    def __getitem__(self, i: int) -> dict:
        if self.transform is None:
            return {k: v[0] for k, v in self.batch([i]).items()}
        raw = {k: v[i].numpy() for k, v in self.arrays.items()}
        raw["image"] = raw["image"][..., None]
        return self._finish(apply(self.transform, raw))

    def _convert(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = dict(b)
        out["image"] = b["image"].unsqueeze(1).float().div_(255)
        if "mask" in out:
            out["mask"] = out["mask"].long()
        return out

    def _finish(self, sample: dict) -> dict:
        return sample


class FashionClassification(_InMemory):
    """``{"image": [1, 28, 28], "label": int64}`` from Fashion-MNIST (``source``: "embedded",
    "full" or "auto", see ``load_fashion_mnist``)."""

    task = "cls"
    num_classes = len(CLASSES)
    classes = CLASSES

    def __init__(
        self,
        split: str = "train",
        source: str = "embedded",
        root: str | Path = DEBIAN_ROOT,
        transform: Callable | None = None,
    ):
        images, labels = load_fashion_mnist(split, source, root)
        super().__init__({"image": images, "label": labels.astype(np.int64)}, transform)


class FashionSegmentation(_InMemory):
    """``{"image": [1, S, S], "mask": [S, S] int64}``: 11 classes (0 = background, c + 1 =
    Fashion-MNIST class c), ``count`` canvases of the split (see ``make_canvases``)."""

    task = "seg"
    num_classes = len(CLASSES) + 1
    classes = ("background", *CLASSES)
    ignore_index = 255

    def __init__(
        self,
        split: str = "train",
        count: int | None = None,
        size: int = 64,
        max_items: int = 3,
        threshold: int = 40,
        seed: int = 0,
        source: str = "embedded",
        root: str | Path = DEBIAN_ROOT,
        transform: Callable | None = None,
    ):
        images, labels = load_fashion_mnist(split, source, root)
        count = len(images) if count is None else count
        canvases = make_canvases(
            images,
            labels,
            count,
            size=size,
            max_items=max_items,
            threshold=threshold,
            seed=[seed, _SPLIT_CODE[split]],
        )
        self.keypoints, self.visible = canvases.pop("keypoints"), canvases.pop("visible")
        # Which split item went where (index into load_fashion_mnist(split, source)): provenance.
        self.item_index, self.item_pos = canvases.pop("item_index"), canvases.pop("item_pos")
        super().__init__(self._keys(canvases), transform)

    def _keys(self, canvases: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": canvases["image"], "mask": canvases["mask"]}


class FashionKeypoints(FashionSegmentation):
    """``{"image": [1, S, S], "heatmap": [10, S/s, S/s], "keypoints": [10, 2], "visible": [10],
    "target_weight": [10]}``: one keypoint type per class (the centroid of that class's item, at
    most one per canvas), Gaussian heatmaps at stride ``heatmap_stride`` with ``sigma`` in
    heatmap pixels. Keypoints are in input pixels (see ``render_heatmaps``)."""

    task = "kpt"
    num_keypoints = NUM_KEYPOINTS
    flip_pairs = ()

    def __init__(self, split: str = "train", heatmap_stride: int = 4, sigma: float = 1.0, **kw):
        size = kw.get("size", 64)
        if size % heatmap_stride:
            raise ValueError(f"canvas size {size} must be divisible by heatmap_stride")
        self.heatmap_size = (size // heatmap_stride, size // heatmap_stride)
        self.heatmap_stride, self.sigma = heatmap_stride, sigma
        super().__init__(split, **kw)

    def _keys(self, canvases: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"image": canvases["image"], "keypoints": self.keypoints, "visible": self.visible}

    def _convert(self, b: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self._finish(super()._convert(b))

    def _finish(self, sample: dict) -> dict:
        return with_heatmap_targets(sample, self.heatmap_size, self.heatmap_stride, self.sigma)
