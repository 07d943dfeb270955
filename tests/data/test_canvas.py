"""Canvases of real Fashion-MNIST items: against a per-pixel loop oracle, hand-made cases, the
datasets built on them, and keypoint heatmaps."""

import math

import numpy as np
import pytest
import torch

from hrnas.data import FashionKeypoints, FashionSegmentation, load_fashion_mnist
from hrnas.data.canvas import make_canvases
from hrnas.data.heatmaps import render_heatmaps


def paste_oracle(images, labels, item_index, item_pos, size, threshold):
    """The rule written as plain loops: each item in order overwrites the pixels where its own
    grey level is non-zero; the label is class + 1 above the threshold, else 0; a class's
    keypoint is the mean (x, y) of its labelled pixels."""
    canvas = np.zeros((size, size), np.uint8)
    mask = np.zeros((size, size), np.uint8)
    for index, (top, left) in zip(item_index, item_pos):
        if index < 0:
            continue
        for i in range(28):
            for j in range(28):
                v = images[index, i, j]
                if v > 0:
                    canvas[top + i, left + j] = v
                    mask[top + i, left + j] = labels[index] + 1 if v > threshold else 0
    keypoints, visible = np.zeros((10, 2)), np.zeros(10, bool)
    for c in range(10):
        ys, xs = np.nonzero(mask == c + 1)
        if len(xs):
            keypoints[c], visible[c] = (xs.mean(), ys.mean()), True
    return canvas, mask, keypoints, visible


@pytest.fixture(scope="module")
def test_items():
    return load_fashion_mnist("test")


@pytest.mark.parametrize("size, max_items, threshold", [(64, 3, 40), (45, 4, 0), (28, 2, 100)])
def test_matches_loop_oracle(test_items, size, max_items, threshold):
    images, labels = test_items
    out = make_canvases(
        images, labels, 12, size=size, max_items=max_items, threshold=threshold, seed=3
    )
    assert out["image"].shape == (12, size, size) and out["mask"].dtype == np.uint8
    for n in range(12):
        canvas, mask, kp, vis = paste_oracle(
            images, labels, out["item_index"][n], out["item_pos"][n], size, threshold
        )
        np.testing.assert_array_equal(out["image"][n], canvas)
        np.testing.assert_array_equal(out["mask"][n], mask)
        np.testing.assert_array_equal(out["visible"][n], vis)
        np.testing.assert_allclose(out["keypoints"][n], kp, rtol=0, atol=1e-4)
        placed = out["item_index"][n][out["item_index"][n] >= 0]
        assert 1 <= len(placed) <= max_items
        assert len(set(labels[placed])) == len(placed), "classes on one canvas must differ"


def test_image_and_label_agree(test_items):
    out = make_canvases(*test_items, 200, seed=1)
    np.testing.assert_array_equal(out["image"] > 40, out["mask"] > 0)
    assert out["item_index"].max() < len(test_items[0])


def test_hand_made_occlusion():
    # Class 0: a 100-grey block on columns 0..13; class 1: a faint (30 < threshold) block on
    # columns 10..27. On a 28x28 canvas both sit at (0, 0).
    images = np.zeros((10, 28, 28), np.uint8)
    images[0, :, :14] = 100
    images[1, :, 10:] = 30
    for c in range(2, 10):
        images[c, 5, 5] = 200
    labels = np.arange(10)
    for seed in range(200):
        out = make_canvases(images, labels, 1, size=28, max_items=2, seed=seed)
        if out["item_index"][0].tolist() == [0, 1]:
            break
    else:
        pytest.fail("no seed in 0..199 pastes class 0 then class 1")
    expected = np.zeros((28, 28), np.uint8)
    expected[:, :10] = 1  # class 0 keeps columns 0..9; the faint block covers 10..13 as background
    np.testing.assert_array_equal(out["mask"][0], expected)
    assert out["image"][0, 0, 12] == 30 and out["image"][0, 0, 5] == 100
    assert out["visible"][0].tolist() == [True] + [False] * 9
    np.testing.assert_allclose(out["keypoints"][0, 0], [4.5, 13.5])


def test_seeded_and_validated(test_items):
    a = make_canvases(*test_items, 5, seed=[7, 1])
    b = make_canvases(*test_items, 5, seed=[7, 1])
    c = make_canvases(*test_items, 5, seed=[7, 0])
    np.testing.assert_array_equal(a["image"], b["image"])
    assert not np.array_equal(a["image"], c["image"])
    images, labels = test_items
    with pytest.raises(ValueError, match=r"\[M, 28, 28\]"):
        make_canvases(images[:, :20], labels, 1)
    with pytest.raises(TypeError, match="uint8"):
        make_canvases(images.astype(np.float32), labels, 1)
    with pytest.raises(ValueError, match="canvas size must be >= 28"):
        make_canvases(images, labels, 1, size=20)
    with pytest.raises(ValueError, match=r"classes \[9\] have none"):
        make_canvases(images[labels < 9], labels[labels < 9], 1)
    with pytest.raises(ValueError, match="max_items"):
        make_canvases(images, labels, 1, max_items=11)


def test_datasets_use_their_own_split():
    images, labels = load_fashion_mnist("test")
    ds = FashionSegmentation("test", count=6, size=48, seed=2)
    assert (ds.num_classes, ds.task, len(ds)) == (11, "seg", 6)
    for n in range(6):
        canvas, mask, _, _ = paste_oracle(images, labels, ds.item_index[n], ds.item_pos[n], 48, 40)
        sample = ds[n]
        assert sample["image"].shape == (1, 48, 48) and sample["mask"].dtype == torch.int64
        np.testing.assert_array_equal(sample["image"][0].mul(255).round().numpy(), canvas)
        np.testing.assert_array_equal(sample["mask"].numpy(), mask)
    batch = ds.batch(torch.tensor([4, 1]))
    torch.testing.assert_close(batch["mask"][1], ds[1]["mask"])
    train = FashionSegmentation("train", count=6, size=48, seed=2)
    assert not np.array_equal(train.item_pos, ds.item_pos), "splits draw different layouts"


def test_keypoint_dataset_heatmaps():
    ds = FashionKeypoints("test", count=8, heatmap_stride=4, sigma=1.0)
    batch = ds.batch(range(8))
    assert batch["heatmap"].shape == (8, 10, 16, 16)
    vis = batch["visible"]
    assert torch.equal(batch["target_weight"], vis.float())
    assert torch.all(batch["heatmap"][~vis] == 0)
    peak = batch["heatmap"].flatten(-2).argmax(-1)
    expected = ((batch["keypoints"] + 0.5) / 4 - 0.5).round().long().clamp(0, 15)
    assert torch.equal(peak[vis], (expected[..., 1] * 16 + expected[..., 0])[vis])
    one = ds[3]
    torch.testing.assert_close(one["heatmap"], batch["heatmap"][3])
    with pytest.raises(ValueError, match="divisible by heatmap_stride"):
        FashionKeypoints("test", count=2, size=30, heatmap_stride=4)


def test_render_heatmaps_hand_values():
    kp = torch.tensor([[[2.0, 1.0], [5.5, 5.5], [0.0, 0.0]]])
    vis = torch.tensor([[True, True, False]])
    h = render_heatmaps(kp, vis, (4, 5), stride=1.0, sigma=1.0)
    assert h.shape == (1, 3, 4, 5)
    assert h[0, 0, 1, 2] == 1.0
    assert math.isclose(h[0, 0, 1, 3].item(), math.exp(-0.5), rel_tol=1e-6)
    assert math.isclose(h[0, 0, 3, 4].item(), math.exp(-(4 + 4) / 2), rel_tol=1e-6)
    assert torch.all(h[0, 2] == 0)
    # stride 4: x = 5.5 -> (5.5 + 0.5) / 4 - 0.5 = 1.0, exactly on heatmap pixel 1.
    h4 = render_heatmaps(kp, vis, (4, 5), stride=4.0, sigma=2.0)
    assert h4[0, 1, 1, 1] == 1.0
    with pytest.raises(ValueError, match="keypoints must be"):
        render_heatmaps(kp[..., :1], vis, (4, 5), 1.0)
    with pytest.raises(ValueError, match="must be > 0"):
        render_heatmaps(kp, vis, (4, 5), 0.0)
