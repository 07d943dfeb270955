"""Real-dataset loaders on tiny fixtures written here in each dataset's native layout."""

import json

import numpy as np
import pytest
import torch

from hrnas.data import (
    ADE20K,
    COCO_FLIP_PAIRS,
    Cityscapes,
    CocoKeypoints,
    ImageFolder,
    build_dataset,
)
from hrnas.data.segmentation import CITYSCAPES_TRAIN_IDS
from hrnas.data.transforms import RandomHorizontalFlip

Image = pytest.importorskip("PIL.Image", reason="the loaders read files with Pillow")


def save(path, array):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)


def rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3)).astype(np.uint8)


def test_image_folder(tmp_path):
    a, b = rgb(5, 7, 0), rgb(4, 4, 1)
    save(tmp_path / "train" / "dog" / "x.png", a)
    save(tmp_path / "train" / "cat" / "y.png", b)
    save(tmp_path / "train" / "cat" / "z.png", a)
    (tmp_path / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = build_dataset("imagefolder", "train", root=tmp_path)
    assert ds.classes == ["cat", "dog"] and len(ds) == 3 and ds.num_classes == 2
    item = ds[2]
    assert item["label"].item() == 1 and item["image"].shape == (3, 5, 7)
    np.testing.assert_array_equal(item["image"].mul(255).round().byte().permute(1, 2, 0).numpy(), a)
    assert [ds[i]["label"].item() for i in range(3)] == [0, 0, 1]
    (tmp_path / "train" / "empty").mkdir()
    with pytest.raises(ValueError, match="class folder 'empty' holds no image"):
        ImageFolder(tmp_path / "train")
    with pytest.raises(FileNotFoundError, match="directory not found"):
        build_dataset("imagefolder", "val", root=tmp_path)
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder(tmp_path / "train" / "dog")


def cityscapes_fixture(root):
    ids = np.array([[7, 26, 0, 9], [33, 23, 24, 255], [11, 8, 31, 4]], np.uint8)
    for split, city, name in [("train", "aachen", "aachen_000000_000019"), ("val", "bonn", "b_1")]:
        save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png", rgb(3, 4, 2))
        save(root / "gtFine" / split / city / f"{name}_gtFine_labelIds.png", ids)
    return ids


def test_cityscapes(tmp_path):
    ids = cityscapes_fixture(tmp_path)
    ds = Cityscapes(tmp_path, "train")
    assert len(ds) == 1 and ds.num_classes == 19
    item = ds[0]
    expected = [[0, 13, 255, 255], [18, 10, 11, 255], [2, 1, 16, 255]]
    assert item["mask"].tolist() == expected and item["mask"].dtype == torch.int64
    assert item["image"].shape == (3, 3, 4)
    assert sorted(CITYSCAPES_TRAIN_IDS.values()) == list(range(19))
    assert ids.shape == (3, 4)
    label = tmp_path / "gtFine" / "val" / "bonn" / "b_1_gtFine_labelIds.png"
    label.unlink()
    with pytest.raises(FileNotFoundError, match="b_1_gtFine_labelIds.png"):
        Cityscapes(tmp_path, "val")
    with pytest.raises(FileNotFoundError, match="Cityscapes images: directory not found"):
        Cityscapes(tmp_path / "nowhere")
    with pytest.raises(ValueError, match="split must be one of"):
        Cityscapes(tmp_path, "training")


def test_ade20k(tmp_path):
    base = tmp_path / "ADEChallengeData2016"
    ann = np.array([[0, 1, 150], [2, 0, 75]], np.uint8)
    save(base / "images" / "validation" / "ADE_val_00000001.jpg", rgb(2, 3, 4))
    save(base / "annotations" / "validation" / "ADE_val_00000001.png", ann)
    for root in (tmp_path, base):
        ds = ADE20K(root, "val")
        item = ds[0]
        assert item["mask"].tolist() == [[255, 0, 149], [1, 255, 74]]
        assert item["image"].shape == (3, 2, 3) and ds.num_classes == 150
    save(base / "annotations" / "validation" / "ADE_val_00000001.png", ann[:1])
    with pytest.raises(ValueError, match=r"is \(2, 3\) but its label"):
        ADE20K(tmp_path, "validation")[0]
    save(base / "images" / "training" / "ADE_train_00000001.jpg", rgb(2, 3, 4))
    with pytest.raises(FileNotFoundError, match="ADE20K annotations: directory not found"):
        ADE20K(tmp_path, "training")


def coco_fixture(root):
    """val2017 with two images: one person with keypoints, plus a crowd and a keypoint-less
    person that must be skipped."""
    image = np.zeros((64, 48, 3), np.uint8)
    image[20, 10] = 255
    save(root / "val2017" / "000000000001.jpg", image)
    Image.fromarray(image).save(root / "val2017" / "p1.png")
    kp = np.zeros((17, 3))
    kp[0] = (10.5, 20.5, 2)  # nose at pixel (row 20, column 10)
    kp[1] = (30.5, 8.5, 1)  # left eye, labelled but occluded: still a target
    kp[2] = (5.5, 40.5, 0)  # right eye: not labelled
    person = {
        "id": 1,
        "image_id": 1,
        "category_id": 1,
        "iscrowd": 0,
        "bbox": [0, 0, 48, 64],
        "area": 48 * 64,
        "num_keypoints": 2,
        "keypoints": kp.ravel().tolist(),
    }
    crowd = dict(person, id=2, iscrowd=1)
    empty = dict(person, id=3, num_keypoints=0, keypoints=[0] * 51)
    ann = {
        "images": [
            {"id": 1, "file_name": "p1.png", "width": 48, "height": 64},
            {"id": 2, "file_name": "000000000001.jpg", "width": 48, "height": 64},
        ],
        "annotations": [person, crowd, empty],
        "categories": [{"id": 1, "name": "person", "supercategory": "person"}],
    }
    (root / "annotations").mkdir(parents=True)
    (root / "annotations" / "person_keypoints_val2017.json").write_text(json.dumps(ann))
    return image


def test_coco_keypoints(tmp_path):
    pytest.importorskip("pycocotools", reason="COCO keypoints need pycocotools (extra 'coco')")
    image = coco_fixture(tmp_path)
    ds = CocoKeypoints(tmp_path, "val", input_size=(64, 48), box_scale=1.0, sigma=2.0)
    assert len(ds) == 1 and ds.num_keypoints == 17
    item = ds[0]
    # box == window and input size == image size: the affine crop is the identity.
    np.testing.assert_array_equal(item["image"].mul(255).round().byte().permute(1, 2, 0), image)
    torch.testing.assert_close(
        item["keypoints"][:3], torch.tensor([[10.0, 20.0], [30, 8], [5, 40]])
    )
    assert item["visible"][:3].tolist() == [True, True, False] and not item["visible"][3:].any()
    assert item["heatmap"].shape == (17, 16, 12)
    # nose: (10 + 0.5) / 4 - 0.5 = 2.125, (20 + 0.5) / 4 - 0.5 = 4.625 -> peak at (x 2, y 5)
    assert item["heatmap"][0].flatten().argmax().item() == 5 * 12 + 2
    assert torch.equal(item["target_weight"], item["visible"].float())

    flipped = CocoKeypoints(
        tmp_path,
        "val",
        input_size=(64, 48),
        box_scale=1.0,
        transform=RandomHorizontalFlip(1.0, COCO_FLIP_PAIRS),
    )[0]
    # The left eye (index 1) becomes the right eye (index 2) at x' = 47 - 30.
    torch.testing.assert_close(flipped["keypoints"][2], torch.tensor([17.0, 8.0]))
    assert flipped["visible"][:3].tolist() == [True, False, True]
    assert torch.all(flipped["heatmap"][1] == 0)


def test_coco_crop_aspect_and_errors(tmp_path):
    pytest.importorskip("pycocotools", reason="COCO keypoints need pycocotools (extra 'coco')")
    coco_fixture(tmp_path)
    ds = CocoKeypoints(tmp_path, "val", input_size=(32, 32), heatmap_stride=4)
    item = ds[0]
    # 48x64 box -> square 64x64 window x1.25 = 80 around (24, 32): x0 = -16, scale 32 / 80.
    x = (10.5 + 16) * 32 / 80 - 0.5
    y = (20.5 + 8) * 32 / 80 - 0.5
    torch.testing.assert_close(item["keypoints"][0], torch.tensor([x, y]))
    assert item["image"].shape == (3, 32, 32) and item["heatmap"].shape == (17, 8, 8)
    with pytest.raises(FileNotFoundError, match="person_keypoints_train2017.json"):
        CocoKeypoints(tmp_path, "train")
    with pytest.raises(ValueError, match="divisible by heatmap_stride"):
        CocoKeypoints(tmp_path, "val", input_size=(30, 32))


def test_build_dataset_errors():
    with pytest.raises(ValueError, match="unknown dataset 'mnist'; choose one of"):
        build_dataset("mnist", "train")
    with pytest.raises(ValueError, match="has no option 'colour'"):
        build_dataset("cityscapes", "train", root=".", colour=True)
    with pytest.raises(ValueError, match="needs root="):
        build_dataset("imagefolder", "train")


def test_build_dataset_passes_options_through_subclasses():
    ds = build_dataset("fashion-kpt", "test", count=3, size=32, heatmap_stride=2, sigma=1.5)
    assert ds.batch([0])["heatmap"].shape == (1, 10, 16, 16) and ds.sigma == 1.5
    with pytest.raises(ValueError, match=r"has no option 'stride'.*'heatmap_stride'"):
        build_dataset("fashion-kpt", "test", stride=2)
