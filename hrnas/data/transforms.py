"""Small joint transforms for images, masks, heatmaps and keypoints (no torchvision).

A sample is a dict. Before ``ToTensor`` its arrays are NumPy:

- ``image``: ``[H, W, C]`` uint8 or float32;
- ``mask``: ``[H, W]`` integer class ids (``ignore_index`` where unlabelled);
- ``heatmap``: ``[K, H, W]`` float32;
- ``keypoints``: ``[K, 2]`` float32 (x, y) in pixel coordinates, pixel ``(i, j)`` centred at
  ``x = j, y = i``; ``visible``: ``[K]`` bool.

Every geometric transform moves all present keys together: images and heatmaps are resampled
bilinearly (area-averaged when shrinking), masks by nearest neighbour, keypoints by the same map
(``x' = (x + 0.5) * s - 0.5`` for a resize by ``s``, ``x' = x - left`` for a crop,
``x' = W - 1 - x`` for a flip), and a keypoint that leaves the image becomes invisible. Other keys
pass through. Randomness comes from torch's generator, so DataLoader workers draw different
streams (torch seeds each worker).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

Sample = dict


def _size2(size: int | Sequence[int], name: str) -> tuple[int, int]:
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    if h < 1 or w < 1:
        raise ValueError(f"{name} size must be positive, got {size}")
    return int(h), int(w)


def _hw(sample: Sample) -> tuple[int, int]:
    if "image" not in sample:
        raise ValueError(f"sample has no 'image' (keys: {sorted(sample)})")
    return sample["image"].shape[:2]


def _uniform(low: float, high: float) -> float:
    return low + (high - low) * torch.rand(()).item()


def _resize_array(arr: np.ndarray, size: tuple[int, int], channels_last: bool, nearest: bool):
    t = torch.from_numpy(np.ascontiguousarray(arr))
    if t.dim() == 2:
        t = t[None]
        channels_last = False
        squeeze = True
    else:
        squeeze = False
    if channels_last:
        t = t.permute(2, 0, 1)
    x = t[None].float()
    if nearest:
        out = F.interpolate(x, size=size, mode="nearest-exact")
    else:
        shrink = size[0] < x.shape[-2] or size[1] < x.shape[-1]
        out = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=shrink)
    out = out[0]
    if channels_last:
        out = out.permute(1, 2, 0)
    if squeeze:
        out = out[0]
    if arr.dtype == np.uint8:
        out = out.round().clamp(0, 255)
    return out.numpy().astype(arr.dtype)


def hide_outside(sample: Sample) -> None:
    """Mark keypoints outside the image (pixel centres ``[0, W - 1] x [0, H - 1]``) invisible,
    in place."""
    if "keypoints" not in sample:
        return
    h, w = _hw(sample)
    kp = sample["keypoints"]
    inside = (kp[:, 0] >= 0) & (kp[:, 0] <= w - 1) & (kp[:, 1] >= 0) & (kp[:, 1] <= h - 1)
    sample["visible"] = sample["visible"] & inside


def resize(sample: Sample, size: tuple[int, int]) -> Sample:
    """Resize every present key to ``size = (h, w)``."""
    h0, w0 = _hw(sample)
    out = dict(sample)
    out["image"] = _resize_array(sample["image"], size, channels_last=True, nearest=False)
    if "mask" in sample:
        out["mask"] = _resize_array(sample["mask"], size, channels_last=False, nearest=True)
    if "heatmap" in sample:
        out["heatmap"] = _resize_array(sample["heatmap"], size, channels_last=False, nearest=False)
    if "keypoints" in sample:
        scale = np.array([size[1] / w0, size[0] / h0], np.float32)
        out["keypoints"] = (sample["keypoints"] + 0.5) * scale - 0.5
        hide_outside(out)
    return out


def crop(sample: Sample, top: int, left: int, h: int, w: int, ignore_index: int = 255) -> Sample:
    """The window rows ``[top, top + h)``, columns ``[left, left + w)``; parts outside the image
    are filled with 0 (image, heatmap) or ``ignore_index`` (mask)."""
    h0, w0 = _hw(sample)
    src_r = slice(max(top, 0), min(top + h, h0))
    src_c = slice(max(left, 0), min(left + w, w0))
    dst_r = slice(src_r.start - top, src_r.stop - top)
    dst_c = slice(src_c.start - left, src_c.stop - left)
    out = dict(sample)

    def cut(arr, lead, fill):
        shape = (*arr.shape[:lead], h, w, *arr.shape[lead + 2 :])
        res = np.full(shape, fill, arr.dtype)
        index = (slice(None),) * lead
        if src_r.start < src_r.stop and src_c.start < src_c.stop:
            res[(*index, dst_r, dst_c)] = arr[(*index, src_r, src_c)]
        return res

    out["image"] = cut(sample["image"], 0, 0)
    if "mask" in sample:
        out["mask"] = cut(sample["mask"], 0, ignore_index)
    if "heatmap" in sample:
        out["heatmap"] = cut(sample["heatmap"], 1, 0)
    if "keypoints" in sample:
        out["keypoints"] = sample["keypoints"] - np.array([left, top], np.float32)
        hide_outside(out)
    return out


def hflip(sample: Sample, flip_pairs: Sequence[tuple[int, int]] = ()) -> Sample:
    """Mirror left-right; keypoint/heatmap channels listed in ``flip_pairs`` swap (a left wrist
    becomes the right wrist)."""
    _, w = _hw(sample)
    out = dict(sample)
    out["image"] = np.ascontiguousarray(sample["image"][:, ::-1])
    if "mask" in sample:
        out["mask"] = np.ascontiguousarray(sample["mask"][:, ::-1])
    perm = np.arange(
        len(sample["keypoints"]) if "keypoints" in sample else len(sample.get("heatmap", []))
    )
    for a, b in flip_pairs:
        perm[a], perm[b] = b, a
    if "heatmap" in sample:
        out["heatmap"] = np.ascontiguousarray(sample["heatmap"][perm, :, ::-1])
    if "keypoints" in sample:
        kp = sample["keypoints"].copy()
        kp[:, 0] = w - 1 - kp[:, 0]
        out["keypoints"] = kp[perm]
        out["visible"] = sample["visible"][perm]
    return out


class Compose:
    def __init__(self, transforms: Sequence[Callable[[Sample], Sample]]):
        self.transforms = list(transforms)

    def __call__(self, sample: Sample) -> Sample:
        for t in self.transforms:
            sample = t(sample)
        return sample


class Resize:
    """Resize to a fixed ``size`` (int or (h, w))."""

    def __init__(self, size: int | Sequence[int]):
        self.size = _size2(size, "Resize")

    def __call__(self, sample: Sample) -> Sample:
        return resize(sample, self.size)


class RandomScale:
    """Resize by a factor drawn uniformly from ``scale_range`` (the segmentation recipe's
    0.5-2 jitter)."""

    def __init__(self, scale_range: tuple[float, float] = (0.5, 2.0)):
        lo, hi = scale_range
        if not 0 < lo <= hi:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {scale_range}")
        self.scale_range = (lo, hi)

    def __call__(self, sample: Sample) -> Sample:
        s = _uniform(*self.scale_range)
        h, w = _hw(sample)
        return resize(sample, (max(1, round(h * s)), max(1, round(w * s))))


class RandomCrop:
    """A uniformly placed ``size`` window; an image smaller than the window is padded
    (image 0, mask ``ignore_index``)."""

    def __init__(self, size: int | Sequence[int], ignore_index: int = 255):
        self.size = _size2(size, "RandomCrop")
        self.ignore_index = ignore_index

    def __call__(self, sample: Sample) -> Sample:
        h, w = _hw(sample)
        ch, cw = self.size
        top = int(torch.randint(0, max(h - ch, 0) + 1, ()).item())
        left = int(torch.randint(0, max(w - cw, 0) + 1, ()).item())
        return crop(sample, top, left, ch, cw, self.ignore_index)


class CenterCrop:
    def __init__(self, size: int | Sequence[int], ignore_index: int = 255):
        self.size = _size2(size, "CenterCrop")
        self.ignore_index = ignore_index

    def __call__(self, sample: Sample) -> Sample:
        h, w = _hw(sample)
        ch, cw = self.size
        return crop(sample, (h - ch) // 2, (w - cw) // 2, ch, cw, self.ignore_index)


class RandomResizedCrop:
    """Crop a random window of area fraction ``scale`` and aspect ratio ``ratio`` (log-uniform),
    resize it to ``size`` (the classification recipe). After 10 draws that do not fit, falls back
    to the largest centred window with the ratio clamped into ``ratio``."""

    def __init__(
        self,
        size: int | Sequence[int],
        scale: tuple[float, float] = (0.08, 1.0),
        ratio: tuple[float, float] = (3 / 4, 4 / 3),
    ):
        self.size = _size2(size, "RandomResizedCrop")
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < low <= high <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < low <= high, got {ratio}")
        self.scale, self.ratio = scale, ratio

    def window(self, h: int, w: int) -> tuple[int, int, int, int]:
        area = h * w
        log_r = (math.log(self.ratio[0]), math.log(self.ratio[1]))
        for _ in range(10):
            target = area * _uniform(*self.scale)
            r = math.exp(_uniform(*log_r))
            cw = round(math.sqrt(target * r))
            ch = round(math.sqrt(target / r))
            if 0 < cw <= w and 0 < ch <= h:
                top = int(torch.randint(0, h - ch + 1, ()).item())
                left = int(torch.randint(0, w - cw + 1, ()).item())
                return top, left, ch, cw
        r = min(max(w / h, self.ratio[0]), self.ratio[1])
        cw, ch = (w, round(w / r)) if w / h <= r else (round(h * r), h)
        return (h - ch) // 2, (w - cw) // 2, ch, cw

    def __call__(self, sample: Sample) -> Sample:
        top, left, ch, cw = self.window(*_hw(sample))
        return resize(crop(sample, top, left, ch, cw), self.size)


class RandomHorizontalFlip:
    def __init__(self, p: float = 0.5, flip_pairs: Sequence[tuple[int, int]] = ()):
        if not 0 <= p <= 1:
            raise ValueError(f"flip probability must be in [0, 1], got {p}")
        self.p, self.flip_pairs = p, tuple(flip_pairs)

    def __call__(self, sample: Sample) -> Sample:
        if torch.rand(()).item() < self.p:
            return hflip(sample, self.flip_pairs)
        return sample


class ToTensor:
    """NumPy sample -> tensors: image ``[C, H, W]`` float32 (uint8 scaled by 1/255), mask int64,
    heatmap/keypoints float32, visible bool; other array or number keys via ``torch.as_tensor``."""

    def __call__(self, sample: Sample) -> Sample:
        out = {}
        for key, value in sample.items():
            if key == "image":
                img = torch.from_numpy(np.ascontiguousarray(value)).permute(2, 0, 1)
                out[key] = img.float().div(255) if value.dtype == np.uint8 else img.float()
            elif key == "mask":
                out[key] = torch.from_numpy(np.ascontiguousarray(value)).long()
            elif key in ("heatmap", "keypoints"):
                out[key] = torch.from_numpy(np.ascontiguousarray(value)).float()
            elif key == "visible":
                out[key] = torch.from_numpy(np.ascontiguousarray(value)).bool()
            elif isinstance(value, (np.ndarray, np.generic, int, float, bool)):
                out[key] = torch.as_tensor(value)
            else:
                out[key] = value
        return out


def apply(transform: Callable[[Sample], Sample] | None, sample: Sample) -> Sample:
    """Run a joint transform on a NumPy sample, then ToTensor unless the transform already did
    (every dataset here returns tensors)."""
    if transform is not None:
        sample = transform(sample)
    if not isinstance(sample["image"], torch.Tensor):
        sample = ToTensor()(sample)
    return sample


class Normalize:
    """``(image - mean) / std`` per channel on the tensor image ``[C, H, W]`` (after ToTensor)."""

    def __init__(self, mean: Sequence[float], std: Sequence[float]):
        if len(mean) != len(std) or any(s <= 0 for s in std):
            raise ValueError(f"mean and std need equal lengths and std > 0, got {mean}, {std}")
        self.mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32)[:, None, None]

    def __call__(self, sample: Sample) -> Sample:
        image = sample["image"]
        if not isinstance(image, torch.Tensor) or image.dim() != 3:
            raise TypeError("Normalize expects the [C, H, W] tensor image that ToTensor makes")
        if image.shape[0] != self.mean.shape[0]:
            raise ValueError(f"image has {image.shape[0]} channels, mean/std {self.mean.shape[0]}")
        return {**sample, "image": (image - self.mean) / self.std}
