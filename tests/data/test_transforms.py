"""Joint transforms: images, masks, heatmaps and keypoints move together."""

import numpy as np
import pytest
import torch

from hrnas.data import transforms as T
from hrnas.data.heatmaps import render_heatmaps


def sample(h=6, w=8, k=2):
    rng = np.random.default_rng(0)
    kp = np.array([[1.0, 2.0], [6.0, 4.0]], np.float32)[:k]
    return {
        "image": rng.integers(0, 256, (h, w, 3)).astype(np.uint8),
        "mask": rng.integers(0, 5, (h, w)).astype(np.uint8),
        "heatmap": render_heatmaps(
            torch.from_numpy(kp), torch.ones(k, dtype=torch.bool), (h, w), 1.0
        ).numpy(),
        "keypoints": kp,
        "visible": np.ones(k, bool),
        "label": 3,
    }


def test_hflip_moves_everything_and_swaps_pairs():
    s = sample()
    out = T.hflip(s, flip_pairs=[(0, 1)])
    np.testing.assert_array_equal(out["image"], s["image"][:, ::-1])
    np.testing.assert_array_equal(out["mask"], s["mask"][:, ::-1])
    # keypoint 0 is now the mirror of old keypoint 1: x' = W - 1 - x.
    np.testing.assert_array_equal(out["keypoints"], [[1.0, 4.0], [6.0, 2.0]])
    redrawn = render_heatmaps(
        torch.from_numpy(out["keypoints"]), torch.ones(2, dtype=bool), (6, 8), 1
    )
    np.testing.assert_allclose(out["heatmap"], redrawn.numpy(), atol=1e-6)
    assert out["label"] == 3
    np.testing.assert_array_equal(T.hflip(out, [(0, 1)])["keypoints"], s["keypoints"])


def test_crop_pads_with_ignore_and_hides_keypoints():
    s = sample()
    out = T.crop(s, top=-1, left=3, h=4, w=6, ignore_index=255)
    assert out["image"].shape == (4, 6, 3) and out["heatmap"].shape == (2, 4, 6)
    np.testing.assert_array_equal(out["image"][0], 0)
    np.testing.assert_array_equal(out["mask"][0], 255)
    np.testing.assert_array_equal(out["mask"][1:, :5], s["mask"][0:3, 3:8])
    np.testing.assert_array_equal(out["mask"][:, 5], 255)
    np.testing.assert_array_equal(out["keypoints"], [[-2.0, 3.0], [3.0, 5.0]])
    assert out["visible"].tolist() == [False, False]  # x = -2 left; y = 5 > 3 below
    inner = T.crop(s, 1, 1, 5, 6)
    assert inner["visible"].tolist() == [True, True]


def test_resize_maps_keypoints_through_pixel_centres():
    s = sample(h=4, w=4, k=1)
    s["keypoints"] = np.array([[1.0, 2.0]], np.float32)
    out = T.resize(s, (8, 12))
    # x' = (x + 0.5) * s - 0.5 with s = 3 (x) and 2 (y)
    np.testing.assert_allclose(out["keypoints"], [[4.0, 4.5]])
    np.testing.assert_array_equal(out["mask"], s["mask"].repeat(2, 0).repeat(3, 1))
    assert out["image"].dtype == np.uint8 and out["image"].shape == (8, 12, 3)
    flat = {"image": np.full((4, 4, 1), 77, np.uint8)}
    assert np.all(T.resize(flat, (3, 5))["image"] == 77)


def test_random_resized_crop_window_and_labels():
    torch.manual_seed(0)
    rrc = T.RandomResizedCrop(5, scale=(0.2, 1.0))
    for _ in range(50):
        top, left, h, w = rrc.window(30, 20)
        assert 0 <= top and top + h <= 30 and 0 <= left and left + w <= 20 and h > 0 and w > 0
    s = sample(30, 20)
    out = rrc(s)
    assert out["image"].shape == (5, 5, 3) and out["mask"].shape == (5, 5)
    assert set(np.unique(out["mask"])) <= set(np.unique(s["mask"]))
    # Windows that cannot fit fall back to a centred crop inside the image.
    assert T.RandomResizedCrop(4, scale=(1.0, 1.0), ratio=(4.0, 4.0)).window(10, 10) == (
        4,
        0,
        2,
        10,
    )


def test_scale_and_crop_pipeline_is_reproducible():
    pipeline = T.Compose(
        [T.RandomScale((0.5, 2.0)), T.RandomCrop((7, 9)), T.RandomHorizontalFlip()]
    )
    torch.manual_seed(3)
    a = pipeline(sample(10, 12))
    torch.manual_seed(3)
    b = pipeline(sample(10, 12))
    assert a["image"].shape == (7, 9, 3)
    for key in ("image", "mask", "heatmap", "keypoints", "visible"):
        np.testing.assert_array_equal(a[key], b[key])


def test_to_tensor_and_normalize():
    out = T.ToTensor()(sample())
    assert out["image"].shape == (3, 6, 8) and out["image"].dtype == torch.float32
    assert out["image"].max() <= 1.0 and out["mask"].dtype == torch.int64
    assert out["visible"].dtype == torch.bool and out["label"].item() == 3
    norm = T.Normalize([0.5, 0.25, 0.0], [0.5, 0.25, 2.0])({"image": torch.ones(3, 2, 2)})
    torch.testing.assert_close(norm["image"][:, 0, 0], torch.tensor([1.0, 3.0, 0.5]))
    with pytest.raises(TypeError, match="ToTensor"):
        T.Normalize([0.5], [0.5])({"image": np.zeros((2, 2, 1))})
    with pytest.raises(ValueError, match="3 channels"):
        T.Normalize([0.5], [0.5])({"image": torch.ones(3, 2, 2)})


def test_bad_arguments():
    with pytest.raises(ValueError, match="scale_range"):
        T.RandomScale((2.0, 1.0))
    with pytest.raises(ValueError, match="scale must satisfy"):
        T.RandomResizedCrop(4, scale=(0.0, 1.0))
    with pytest.raises(ValueError, match="flip probability"):
        T.RandomHorizontalFlip(1.5)
    with pytest.raises(ValueError, match="size must be positive"):
        T.RandomCrop((0, 3))
    with pytest.raises(ValueError, match="no 'image'"):
        T.hflip({"mask": np.zeros((2, 2))})
