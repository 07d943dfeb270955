"""Dense tasks made from real Fashion-MNIST pixels: segmentation masks and item-centre keypoints.

The labels are *derived from the images*, not annotated by hand. Each canvas is ``size x size``
(64 by default), black, with 1 to 3 items pasted at uniform random positions, each of a different
class (so a class names at most one item per canvas, as a COCO keypoint type names one joint
per person). Items are pasted in order with replace semantics: every pixel where the item's own
grey level is non-zero overwrites the canvas, and its label becomes ``class + 1`` when that grey
level is above ``threshold`` (40/255 by default), else 0 (background). So image and label agree
under occlusion: a pixel's label is always a function of the pixel shown.

Keypoints: the keypoint of class ``c`` is the centroid of the pixels labelled ``c + 1`` (the
item's visible foreground), in canvas pixel coordinates (pixel ``(i, j)`` has its centre at
``x = j, y = i``), visible when the item exists and keeps at least one labelled pixel. The 10
heatmap channels are Gaussians around those centroids (``hrnas.data.heatmaps``).

Train canvases take items from the train split only, test canvases from t10k only; everything is
fixed by the seed. 10,000 canvases of 64x64 take well under a second.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .fashion_mnist import CLASSES, IMAGE_SIZE

NUM_KEYPOINTS = len(CLASSES)


def make_canvases(
    images: np.ndarray,
    labels: np.ndarray,
    count: int,
    *,
    size: int = 64,
    max_items: int = 3,
    threshold: int = 40,
    seed: int | Sequence[int] = 0,
) -> dict[str, np.ndarray]:
    """Paste items from ``images [M, 28, 28]`` uint8 (classes ``labels [M]``) onto ``count``
    canvases.

    Returns ``image [count, size, size]`` uint8, ``mask [count, size, size]`` uint8 (0 =
    background, c + 1 = class c), ``keypoints [count, 10, 2]`` float32 (x, y of each class's
    item centroid; 0 where invisible), ``visible [count, 10]`` bool, and the provenance of each
    paste in order: ``item_index [count, max_items]`` (index into ``images``, -1 for no item) and
    ``item_pos [count, max_items, 2]`` (top, left; -1 for no item). ``seed`` (an int or a
    sequence of ints) seeds NumPy's PCG64, whose stream NumPy keeps fixed across versions.
    """
    images = np.asarray(images)
    labels = np.asarray(labels)
    if images.ndim != 3 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"images must be [M, 28, 28], got {list(images.shape)}")
    if images.dtype != np.uint8:
        raise TypeError(f"images must be uint8, got {images.dtype}")
    if labels.shape != images.shape[:1]:
        raise ValueError(f"labels {list(labels.shape)} do not match images {list(images.shape)}")
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    if size < IMAGE_SIZE:
        raise ValueError(f"canvas size must be >= {IMAGE_SIZE} (one item), got {size}")
    if not 1 <= max_items <= NUM_KEYPOINTS:
        raise ValueError(f"max_items must be in [1, {NUM_KEYPOINTS}], got {max_items}")
    if not 0 <= threshold < 255:
        raise ValueError(f"threshold must be in [0, 255), got {threshold}")
    pools = [np.flatnonzero(labels == c) for c in range(NUM_KEYPOINTS)]
    if any(len(p) == 0 for p in pools):
        missing = [c for c, p in enumerate(pools) if len(p) == 0]
        raise ValueError(f"every class needs at least one item; classes {missing} have none")

    rng = np.random.Generator(np.random.PCG64(seed))
    n_items = rng.integers(1, max_items + 1, size=count)
    classes = np.argsort(rng.random((count, NUM_KEYPOINTS)), axis=1)[:, :max_items]
    pick = rng.random((count, max_items))
    pos = rng.integers(0, size - IMAGE_SIZE + 1, size=(count, max_items, 2))

    canvas = np.zeros((count, size, size), np.uint8)
    mask = np.zeros((count, size, size), np.uint8)
    offs = np.arange(IMAGE_SIZE)
    windows = []
    item_index = np.full((count, max_items), -1, np.int64)
    for slot in range(max_items):
        rows_n = np.flatnonzero(n_items > slot)
        cls = classes[rows_n, slot]
        pool_len = np.array([len(p) for p in pools])[cls]
        within = np.minimum((pick[rows_n, slot] * pool_len).astype(np.int64), pool_len - 1)
        chosen = np.array([pools[c][w] for c, w in zip(cls, within)], dtype=np.int64)
        item_index[rows_n, slot] = chosen
        items = images[chosen]
        ys = pos[rows_n, slot, 0][:, None, None] + offs[None, :, None]
        xs = pos[rows_n, slot, 1][:, None, None] + offs[None, None, :]
        ns = rows_n[:, None, None]
        paste = items > 0
        canvas[ns, ys, xs] = np.where(paste, items, canvas[ns, ys, xs])
        item_label = np.where(items > threshold, (cls + 1)[:, None, None], 0).astype(np.uint8)
        mask[ns, ys, xs] = np.where(paste, item_label, mask[ns, ys, xs])
        windows.append((rows_n, cls, ys, xs))

    # A class labels one item per canvas, so its labelled pixels all lie in that item's window:
    # the centroid needs only the windows, not a pass over whole canvases.
    keypoints = np.zeros((count, NUM_KEYPOINTS, 2), np.float32)
    visible = np.zeros((count, NUM_KEYPOINTS), bool)
    for rows_n, cls, ys, xs in windows:
        own = mask[rows_n[:, None, None], ys, xs] == (cls + 1)[:, None, None]
        n_own = own.sum(axis=(1, 2))
        seen = n_own > 0
        cx = (own * xs).sum(axis=(1, 2)) / np.maximum(n_own, 1)
        cy = (own * ys).sum(axis=(1, 2)) / np.maximum(n_own, 1)
        keypoints[rows_n[seen], cls[seen]] = np.stack([cx, cy], axis=-1)[seen]
        visible[rows_n[seen], cls[seen]] = True
    item_pos = np.where(item_index[..., None] >= 0, pos, -1)
    return {
        "image": canvas,
        "mask": mask,
        "keypoints": keypoints,
        "visible": visible,
        "item_index": item_index,
        "item_pos": item_pos,
    }
