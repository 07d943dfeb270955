"""Task metrics: top-k accuracy (classification), mIoU (segmentation), PCK (keypoints).

Each metric is a function on one batch plus an accumulator (``update`` per batch, ``compute`` at
the end) that gives the same result as the function on the concatenated batches.

- top-k accuracy: the fraction of samples whose label is among the k largest logits.
- mIoU: confusion matrix ``M[t, p]`` over pixels whose target is not ``ignore_index``;
  ``IoU_c = M[c, c] / (sum_p M[c, p] + sum_t M[t, c] - M[c, c])``; classes absent from both the
  targets and the predictions (union 0) are NaN and left out of the mean (as mmseg's nanmean).
- PCK: a visible keypoint is correct when ``||(pred - gt) / norm|| < threshold``; ``norm`` is
  per sample (a box or image size, per axis or scalar). ``pck_from_heatmaps`` takes the argmax
  of each heatmap channel and normalises by a tenth of the heatmap size per axis, so
  ``threshold=0.5`` is the HRNet/SimpleBaseline training accuracy (there with the ground truth taken
  from the target heatmaps' argmax; here from the true coordinates).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def topk_hits(logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)) -> list[int]:
    """For each k, how many of ``target [N]`` are among the k largest of ``logits [N, C]``."""
    if logits.dim() != 2 or target.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, C] and target [N], got {list(logits.shape)} and "
            f"{list(target.shape)}"
        )
    if any(not 1 <= k <= logits.shape[1] for k in topk):
        raise ValueError(f"every k must be in [1, {logits.shape[1]}], got {tuple(topk)}")
    ranked = logits.topk(max(topk), dim=1).indices
    hit = ranked == target[:, None]
    return [int(hit[:, :k].any(dim=1).sum()) for k in topk]


def topk_accuracy(
    logits: torch.Tensor, target: torch.Tensor, topk: Sequence[int] = (1,)
) -> list[float]:
    """Top-k accuracy in [0, 1] for each k, from ``logits [N, C]`` and ``target [N]``."""
    if logits.shape[0] == 0:
        raise ValueError("accuracy of an empty batch is undefined")
    return [h / logits.shape[0] for h in topk_hits(logits, target, topk)]


def confusion_matrix(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> torch.Tensor:
    """``[num_classes, num_classes]`` int64 counts ``M[t, p]`` over pixels with
    ``target != ignore_index``; ``pred`` and ``target`` are class-id tensors of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred {list(pred.shape)} and target {list(target.shape)} differ")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    bad = (t < 0) | (t >= num_classes) | (p < 0) | (p >= num_classes)
    if bad.any():
        raise ValueError(
            f"class ids must lie in [0, {num_classes}) (or be ignore_index={ignore_index} in "
            f"the target); got target {t[bad][:1].tolist()} / pred {p[bad][:1].tolist()}"
        )
    flat = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def iou_from_confusion(confusion: torch.Tensor) -> dict[str, object]:
    """``{"mIoU", "per_class_iou" [C] (NaN where union is 0), "pixel_acc"}`` of a confusion
    matrix."""
    cm = confusion.double()
    inter = cm.diag()
    union = cm.sum(0) + cm.sum(1) - inter
    iou = torch.where(union > 0, inter / union.clamp(min=1), torch.full_like(inter, float("nan")))
    present = ~iou.isnan()
    total = cm.sum()
    return {
        "mIoU": iou[present].mean().item() if present.any() else float("nan"),
        "per_class_iou": iou,
        "pixel_acc": (inter.sum() / total).item() if total > 0 else float("nan"),
    }


def mean_iou(
    pred: torch.Tensor, target: torch.Tensor, num_classes: int, ignore_index: int = 255
) -> dict[str, object]:
    """mIoU of class-id maps ``pred`` and ``target`` (see the module docstring)."""
    return iou_from_confusion(confusion_matrix(pred, target, num_classes, ignore_index))


def heatmap_argmax(heatmaps: torch.Tensor) -> torch.Tensor:
    """``[..., K, h, w]`` -> ``[..., K, 2]`` (x, y) of each channel's maximum (first on ties)."""
    if heatmaps.dim() < 3:
        raise ValueError(f"heatmaps must be [..., K, h, w], got {list(heatmaps.shape)}")
    w = heatmaps.shape[-1]
    flat = heatmaps.flatten(-2).argmax(-1)
    return torch.stack([flat % w, flat // w], dim=-1).to(heatmaps.dtype)


def pck_hits(
    pred: torch.Tensor,
    gt: torch.Tensor,
    visible: torch.Tensor,
    norm: torch.Tensor | float,
    threshold: float,
) -> tuple[int, int]:
    """(correct, counted) visible keypoints: ``pred``/``gt`` ``[N, K, 2]``, ``visible [N, K]``,
    ``norm`` a scalar, ``[N]`` or ``[N, 2]`` (per axis)."""
    if pred.shape != gt.shape or pred.shape[-1] != 2 or visible.shape != pred.shape[:-1]:
        raise ValueError(
            f"expected pred and gt [N, K, 2] and visible [N, K], got {list(pred.shape)}, "
            f"{list(gt.shape)} and {list(visible.shape)}"
        )
    norm = torch.as_tensor(norm, dtype=torch.float64)
    if (norm <= 0).any():
        raise ValueError("PCK norm must be > 0")
    if norm.dim() == 1:
        norm = norm[:, None, None]
    elif norm.dim() == 2:
        norm = norm[:, None, :]
    dist = ((pred.double() - gt.double()) / norm).norm(dim=-1)
    visible = visible.bool()
    return int((dist[visible] < threshold).sum()), int(visible.sum())


def _fraction(correct: int, counted: int) -> float:
    return correct / counted if counted else float("nan")


def pck(pred, gt, visible, norm, threshold: float) -> float:
    """Fraction of visible keypoints within ``threshold * norm`` (NaN when none is visible)."""
    return _fraction(*pck_hits(pred, gt, visible, norm, threshold))


def heatmap_pck_hits(
    heatmaps: torch.Tensor,
    gt: torch.Tensor,
    visible: torch.Tensor,
    threshold: float = 0.5,
    stride: float = 1.0,
) -> tuple[int, int]:
    """(correct, counted) for heatmaps ``[N, K, h, w]``: prediction = argmax, ``gt [N, K, 2]`` in
    input pixels mapped to heatmap pixels by ``(x + 0.5) / stride - 0.5`` (``stride=1``: gt is
    already in heatmap pixels), norm = ``(w / 10, h / 10)``."""
    h, w = heatmaps.shape[-2:]
    norm = torch.tensor([[w / 10, h / 10]], dtype=torch.float64).expand(len(heatmaps), 2)
    gt_hm = (gt.double() + 0.5) / stride - 0.5
    return pck_hits(heatmap_argmax(heatmaps).double(), gt_hm, visible, norm, threshold)


def pck_from_heatmaps(
    heatmaps: torch.Tensor,
    gt: torch.Tensor,
    visible: torch.Tensor,
    threshold: float = 0.5,
    stride: float = 1.0,
) -> float:
    """PCK of heatmap predictions (see ``heatmap_pck_hits``); NaN when no keypoint is visible."""
    return _fraction(*heatmap_pck_hits(heatmaps, gt, visible, threshold, stride))


class Accuracy:
    """Running top-k accuracy."""

    def __init__(self, topk: Sequence[int] = (1,)):
        self.topk = tuple(topk)
        self.hits = [0] * len(self.topk)
        self.count = 0

    def update(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        for i, hits in enumerate(topk_hits(logits, target, self.topk)):
            self.hits[i] += hits
        self.count += len(target)

    def compute(self) -> dict[str, float]:
        if not self.count:
            raise ValueError("Accuracy.compute() before any update()")
        return {f"top{k}": h / self.count for k, h in zip(self.topk, self.hits)}


class MeanIoU:
    """Running confusion matrix; ``update`` takes class-id maps or logits ``[N, C, H, W]``."""

    def __init__(self, num_classes: int, ignore_index: int = 255):
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)

    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        if pred.dim() == target.dim() + 1:
            pred = pred.argmax(1)
        self.confusion += confusion_matrix(
            pred.detach().cpu(), target.cpu(), self.num_classes, self.ignore_index
        )

    def compute(self) -> dict[str, object]:
        return iou_from_confusion(self.confusion)


class PCK:
    """Running PCK of heatmaps (``heatmap_pck_hits``; ``stride``: input pixels per heatmap
    pixel of the keypoints passed to ``update``)."""

    def __init__(self, threshold: float = 0.5, stride: float = 1.0):
        self.threshold, self.stride = threshold, stride
        self.correct = self.counted = 0

    def update(self, heatmaps: torch.Tensor, gt: torch.Tensor, visible: torch.Tensor) -> None:
        c, n = heatmap_pck_hits(
            heatmaps.detach().cpu(), gt.cpu(), visible.cpu(), self.threshold, self.stride
        )
        self.correct += c
        self.counted += n

    def compute(self) -> dict[str, float]:
        return {"PCK": _fraction(self.correct, self.counted)}
