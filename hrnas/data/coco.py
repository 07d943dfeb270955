"""COCO person keypoints (top-down, one sample per person instance), read with pycocotools.

Layout: ``root/annotations/person_keypoints_<split><year>.json`` and
``root/<split><year>/<file_name>``. An instance is kept when it is a non-crowd person with at
least one labelled keypoint and a box of positive size inside the image.

Each sample is the person's box cut out by an affine crop: the box is widened or heightened to
the input aspect ratio around its centre and enlarged by ``box_scale`` (1.25, the HRNet/
SimpleBaseline convention), then resampled bilinearly to ``input_size`` (256x192 in the paper's
recipe). The 17 keypoints follow the same map; a keypoint is visible when labelled (COCO v > 0)
and inside the crop. ``transform`` (e.g. ``RandomHorizontalFlip(flip_pairs=COCO_FLIP_PAIRS)``)
acts on the crop; then heatmaps are drawn at ``input_size / heatmap_stride`` with ``sigma`` (2 in
the paper's recipe at 64x48).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._io import read_image, require_dir
from .heatmaps import with_heatmap_targets
from .transforms import apply, hide_outside

COCO_KEYPOINTS = (
    "nose",
    "left_eye",
    "right_eye",
    "left_ear",
    "right_ear",
    "left_shoulder",
    "right_shoulder",
    "left_elbow",
    "right_elbow",
    "left_wrist",
    "right_wrist",
    "left_hip",
    "right_hip",
    "left_knee",
    "right_knee",
    "left_ankle",
    "right_ankle",
)
# Left/right partners that swap under a horizontal flip.
COCO_FLIP_PAIRS = ((1, 2), (3, 4), (5, 6), (7, 8), (9, 10), (11, 12), (13, 14), (15, 16))
PERSON_CATEGORY = 1


def _coco_api():
    try:
        from pycocotools.coco import COCO
    except ImportError as error:
        raise ImportError("COCO keypoints need pycocotools: pip install 'hrnas[coco]'") from error
    return COCO


def crop_box(box: Sequence[float], input_size: tuple[int, int], box_scale: float):
    """The crop window ``(x0, y0, w, h)`` in image coordinates (COCO convention: the image spans
    ``[0, W] x [0, H]``) for a person box ``(x, y, w, h)``: same centre, aspect ratio of
    ``input_size = (h, w)``, enlarged by ``box_scale``."""
    x, y, w, h = box
    aspect = input_size[1] / input_size[0]
    if w > aspect * h:
        h = w / aspect
    else:
        w = h * aspect
    cx, cy = box[0] + box[2] / 2, box[1] + box[3] / 2
    w, h = w * box_scale, h * box_scale
    return cx - w / 2, cy - h / 2, w, h


def affine_crop(image: np.ndarray, window, input_size: tuple[int, int]) -> np.ndarray:
    """Resample ``image [H, W, C]`` uint8 inside ``window = (x0, y0, w, h)`` to ``input_size``
    (bilinear; outside the image is 0). Output pixel ``(i, j)`` samples image point
    ``(x0 + (j + 0.5) w / out_w, y0 + (i + 0.5) h / out_h)``."""
    x0, y0, w, h = window
    out_h, out_w = input_size
    img_h, img_w = image.shape[:2]
    xs = x0 + (torch.arange(out_w, dtype=torch.float64) + 0.5) * (w / out_w)
    ys = y0 + (torch.arange(out_h, dtype=torch.float64) + 0.5) * (h / out_h)
    # grid_sample(align_corners=False) maps -1 and 1 to the image's outer edges, 0 and W here.
    gx = (2 * xs / img_w - 1).float()
    gy = (2 * ys / img_h - 1).float()
    grid = torch.stack(torch.meshgrid(gy, gx, indexing="ij")[::-1], dim=-1)[None]
    src = torch.from_numpy(image).permute(2, 0, 1)[None].float()
    out = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return out[0].permute(1, 2, 0).round().clamp(0, 255).numpy().astype(np.uint8)


def crop_keypoints(keypoints: np.ndarray, window, input_size: tuple[int, int]) -> np.ndarray:
    """COCO keypoints ``[K, 2]`` (image frame ``[0, W]``) -> crop pixel coordinates (pixel
    ``(i, j)`` centred at ``x = j, y = i``), the inverse of ``affine_crop``'s map."""
    x0, y0, w, h = window
    scale = np.array([input_size[1] / w, input_size[0] / h])
    return ((keypoints - np.array([x0, y0])) * scale - 0.5).astype(np.float32)


class CocoKeypoints(torch.utils.data.Dataset):
    """``{"image": [3, h, w], "heatmap": [17, h/s, w/s], "keypoints": [17, 2] (crop pixels),
    "visible": [17] bool, "target_weight": [17] float}`` per person instance."""

    task = "kpt"
    in_channels = 3
    num_keypoints = len(COCO_KEYPOINTS)
    flip_pairs = COCO_FLIP_PAIRS

    def __init__(
        self,
        root: str | Path,
        split: str = "train",
        year: int = 2017,
        input_size: tuple[int, int] = (256, 192),
        heatmap_stride: int = 4,
        sigma: float = 2.0,
        box_scale: float = 1.25,
        transform: Callable | None = None,
    ):
        root = Path(root)
        ann_file = root / "annotations" / f"person_keypoints_{split}{year}.json"
        if not ann_file.is_file():
            raise FileNotFoundError(f"COCO keypoints: annotation file not found: {ann_file}")
        self.image_dir = require_dir(root / f"{split}{year}", "COCO images")
        if input_size[0] % heatmap_stride or input_size[1] % heatmap_stride:
            raise ValueError(
                f"input_size {input_size} must be divisible by heatmap_stride {heatmap_stride}"
            )
        self.input_size = tuple(input_size)
        self.heatmap_size = (input_size[0] // heatmap_stride, input_size[1] // heatmap_stride)
        self.heatmap_stride, self.sigma, self.box_scale = heatmap_stride, sigma, box_scale
        self.transform = transform
        self.coco = _coco_api()(str(ann_file))
        self.instances = []
        for image_id in sorted(self.coco.getImgIds(catIds=[PERSON_CATEGORY])):
            info = self.coco.loadImgs(image_id)[0]
            ann_ids = self.coco.getAnnIds(imgIds=image_id, catIds=[PERSON_CATEGORY], iscrowd=False)
            for ann in self.coco.loadAnns(ann_ids):
                box = self._clipped_box(ann["bbox"], info["width"], info["height"])
                if ann.get("num_keypoints", 0) > 0 and box is not None:
                    kp = np.asarray(ann["keypoints"], np.float32).reshape(-1, 3)
                    if kp.shape[0] != self.num_keypoints:
                        raise ValueError(
                            f"{ann_file}: annotation {ann['id']} has {kp.shape[0]} keypoints, "
                            f"expected {self.num_keypoints}"
                        )
                    self.instances.append((info["file_name"], box, kp))

    @staticmethod
    def _clipped_box(bbox, width: float, height: float):
        x, y, w, h = bbox
        x0, y0 = max(x, 0.0), max(y, 0.0)
        x1, y1 = min(x + max(w, 0.0), width), min(y + max(h, 0.0), height)
        if x1 <= x0 or y1 <= y0:
            return None
        return (x0, y0, x1 - x0, y1 - y0)

    def __len__(self) -> int:
        return len(self.instances)

    def __getitem__(self, i: int) -> dict:
        file_name, box, kp = self.instances[i]
        path = self.image_dir / file_name
        if not path.is_file():
            raise FileNotFoundError(f"COCO keypoints: image file not found: {path}")
        window = crop_box(box, self.input_size, self.box_scale)
        sample = {
            "image": affine_crop(read_image(path), window, self.input_size),
            "keypoints": crop_keypoints(kp[:, :2], window, self.input_size),
            "visible": kp[:, 2] > 0,
        }
        hide_outside(sample)
        sample = apply(self.transform, sample)
        return with_heatmap_targets(sample, self.heatmap_size, self.heatmap_stride, self.sigma)
