"""Metrics against hand-computed values."""

import math

import pytest
import torch

from hrnas.data.heatmaps import render_heatmaps
from hrnas.metrics import (
    PCK,
    Accuracy,
    MeanIoU,
    confusion_matrix,
    heatmap_argmax,
    mean_iou,
    pck,
    pck_from_heatmaps,
    topk_accuracy,
)


def test_topk_accuracy_hand_values():
    logits = torch.tensor([[3.0, 1, 2], [0, 5, 1], [1, 2, 3], [2, 0, 1]])
    target = torch.tensor([0, 2, 1, 1])
    # top-1 picks 0, 1, 2, 0: one hit. top-2 adds 2, 2, 1, 2: hits for rows 0, 1, 2.
    assert topk_accuracy(logits, target, (1, 2, 3)) == [0.25, 0.75, 1.0]
    acc = Accuracy((1, 2))
    acc.update(logits[:3], target[:3])
    acc.update(logits[3:], target[3:])
    assert acc.compute() == {"top1": 0.25, "top2": 0.75}
    with pytest.raises(ValueError, match=r"every k must be in \[1, 3\]"):
        topk_accuracy(logits, target, (4,))
    with pytest.raises(ValueError, match=r"logits \[N, C\] and target \[N\]"):
        topk_accuracy(logits, target[:2])
    with pytest.raises(ValueError, match="before any update"):
        Accuracy().compute()


def test_miou_hand_values():
    target = torch.tensor([[0, 0, 1], [1, 2, 255]])
    pred = torch.tensor([[0, 1, 1], [1, 0, 2]])
    cm = confusion_matrix(pred, target, num_classes=4)
    assert cm.tolist() == [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]
    out = mean_iou(pred, target, num_classes=4)
    # IoU: class 0 = 1 / (2 + 2 - 1), class 1 = 2 / (2 + 3 - 2), class 2 = 0 / 1, class 3 absent.
    iou = out["per_class_iou"]
    assert iou[:3].tolist() == pytest.approx([1 / 3, 2 / 3, 0.0])
    assert math.isnan(iou[3])
    assert out["mIoU"] == pytest.approx(1 / 3)
    assert out["pixel_acc"] == pytest.approx(3 / 5)


def test_miou_accumulates_and_takes_logits():
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 5, (4, 6, 7), generator=g)
    target[0, 0] = 255
    logits = torch.randn(4, 5, 6, 7, generator=g)
    metric = MeanIoU(5)
    metric.update(logits[:1], target[:1])
    metric.update(logits[1:].argmax(1), target[1:])
    whole = mean_iou(logits.argmax(1), target, 5)
    assert metric.compute()["mIoU"] == pytest.approx(whole["mIoU"])
    assert metric.confusion.sum() == 4 * 6 * 7 - 7
    perfect = mean_iou(target, target, 5)
    assert perfect["mIoU"] == 1.0 and perfect["pixel_acc"] == 1.0


def test_miou_rejects_bad_ids():
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\)"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)
    with pytest.raises(ValueError, match=r"pred \[2\] and target \[3\] differ"):
        confusion_matrix(torch.tensor([0, 1]), torch.tensor([0, 1, 2]), 3)


def test_pck_hand_values():
    gt = torch.tensor([[[10.0, 10.0], [20.0, 20.0], [0.0, 0.0]]])
    pred = torch.tensor([[[13.0, 14.0], [20.0, 26.0], [50.0, 50.0]]])
    visible = torch.tensor([[True, True, False]])
    # distances 5 and 6; norm 10 -> 0.5 and 0.6.
    assert pck(pred, gt, visible, torch.tensor([10.0]), 0.55) == 0.5
    assert pck(pred, gt, visible, torch.tensor([10.0]), 0.5) == 0.0  # strictly below
    assert pck(pred, gt, visible, torch.tensor([10.0]), 0.61) == 1.0
    # per-axis norm (x 3, y 100): keypoint 0 -> (1, 0.04) -> 1.0008; keypoint 1 -> 0.06
    assert pck(pred, gt, visible, torch.tensor([[3.0, 100.0]]), 1.0) == 0.5
    assert math.isnan(pck(pred, gt, torch.zeros(1, 3, dtype=torch.bool), 1.0, 0.5))
    with pytest.raises(ValueError, match="norm must be > 0"):
        pck(pred, gt, visible, torch.tensor([0.0]), 0.5)


def test_pck_from_heatmaps():
    hm = torch.zeros(2, 2, 20, 10)
    hm[0, 0, 3, 4] = 1  # (x 4, y 3)
    hm[0, 1, 10, 9] = 1
    hm[1, 0, 0, 0] = 1
    hm[1, 1, 19, 0] = 1
    assert heatmap_argmax(hm)[0].tolist() == [[4.0, 3.0], [9.0, 10.0]]
    # norm (w / 10, h / 10) = (1, 2); threshold 0.5.
    gt = torch.tensor([[[4.4, 3.0], [9.0, 11.5]], [[0.0, 0.9], [3.0, 19.0]]])
    visible = torch.ones(2, 2, dtype=torch.bool)
    # distances: 0.4, 0.75, 0.45, 3.0 -> hits: 1, 0, 1, 0.
    assert pck_from_heatmaps(hm, gt, visible) == 0.5
    metric = PCK()
    metric.update(hm[:1], gt[:1], visible[:1])
    metric.update(hm[1:], gt[1:], visible[1:])
    assert metric.compute() == {"PCK": 0.5}
    # gt given in input pixels at stride 4 maps through (x + 0.5) / 4 - 0.5.
    kp = torch.tensor([[[17.5, 13.5]]])
    drawn = render_heatmaps(kp, torch.ones(1, 1, dtype=torch.bool), (8, 8), 4.0)
    assert pck_from_heatmaps(drawn, kp, torch.ones(1, 1, dtype=torch.bool), stride=4.0) == 1.0
    assert heatmap_argmax(drawn).tolist() == [[[4.0, 3.0]]]
