"""The embedded Fashion-MNIST subset: recorded checksum, layout checks, IDX reading, rebuild."""

import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest

from hrnas.data import fashion_mnist as fm


def write_idx(path, array):
    header = (0x0800 + array.ndim).to_bytes(4, "big")
    header += b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def fake_debian(root, per_class=(6, 3)):
    """A Debian-layout folder with tiny splits: image k of class c is filled with 10 * c + k."""
    for split, n in zip(fm.SPLITS, per_class):
        labels = np.tile(np.arange(10), n)
        images = np.stack([np.full((28, 28), 10 * c + k // 10) for k, c in enumerate(labels)])
        image_file, label_file = fm.IDX_FILES[split]
        write_idx(root / image_file, images)
        write_idx(root / label_file, labels)
    return root


def test_shipped_file_matches_recorded_checksum():
    assert fm.sha256_file(fm.embedded_path()) == fm.EMBEDDED_SHA256


@pytest.mark.parametrize("split, n", [("train", 8000), ("test", 2000)])
def test_embedded_split_is_balanced(split, n):
    images, labels = fm.load_fashion_mnist(split, "embedded")
    assert images.shape == (n, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels, minlength=10).tolist() == [n // 10] * 10
    # Real photographs of clothes: varied grey levels, mostly-black borders.
    assert 0.2 < images.mean() / 255 < 0.4 and len(np.unique(images)) == 256


def test_embedded_train_and_test_come_from_their_own_splits():
    with np.load(fm.embedded_path()) as npz:
        assert npz["train_index"].max() < 60000 and npz["test_index"].max() < 10000
        assert np.all(np.diff(npz["train_index"]) > 0) and np.all(np.diff(npz["test_index"]) > 0)


def test_loader_rejects_bad_checksum_and_layout(tmp_path):
    good = {}
    for split in fm.SPLITS:
        for key, (shape, dtype) in fm._expected_layout(split).items():
            good[key] = np.zeros(shape, dtype)
    path = tmp_path / "ok.npz"
    fm.write_npz(path, good)
    images, labels = fm.load_embedded_split("test", path, sha256=None)
    assert images.shape == (2000, 28, 28)
    with pytest.raises(ValueError, match="SHA-256"):
        fm.load_embedded_split("test", path, sha256="0" * 64)
    bad = dict(good, test_images=good["test_images"].astype(np.float32))
    fm.write_npz(path, bad)
    with pytest.raises(ValueError, match="test_images is float32"):
        fm.load_embedded_split("test", path, sha256=None)
    bad = {k: v for k, v in good.items() if k != "train_labels"}
    fm.write_npz(path, bad)
    with pytest.raises(ValueError, match="'train_labels' missing"):
        fm.load_embedded_split("train", path, sha256=None)
    bad = dict(good, test_labels=np.full(2000, 10, np.uint8))
    fm.write_npz(path, bad)
    with pytest.raises(ValueError, match="labels reach 10"):
        fm.load_embedded_split("test", path, sha256=None)
    with pytest.raises(FileNotFoundError, match="missing.npz"):
        fm.load_embedded_split("test", tmp_path / "missing.npz")


def test_write_npz_is_byte_reproducible(tmp_path):
    arrays = {"b": np.arange(12, dtype=np.int32).reshape(3, 4), "a": np.ones(5, np.uint8)}
    fm.write_npz(tmp_path / "1.npz", arrays)
    fm.write_npz(tmp_path / "2.npz", dict(reversed(arrays.items())))
    assert (tmp_path / "1.npz").read_bytes() == (tmp_path / "2.npz").read_bytes()
    with np.load(tmp_path / "1.npz") as npz:
        np.testing.assert_array_equal(npz["b"], arrays["b"])


def test_read_idx_round_trip_and_errors(tmp_path):
    data = np.arange(2 * 28 * 28).reshape(2, 28, 28) % 256
    write_idx(tmp_path / "x.gz", data)
    np.testing.assert_array_equal(fm.read_idx(tmp_path / "x.gz", 3), data)
    with pytest.raises(ValueError, match="IDX magic 0x803, expected 0x801"):
        fm.read_idx(tmp_path / "x.gz", 1)
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write((0x0803).to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in (2, 28, 28)))
        f.write(b"\0" * 100)
    with pytest.raises(ValueError, match=r"header says \(2, 28, 28\), payload has 100"):
        fm.read_idx(tmp_path / "short.gz", 3)
    with pytest.raises(FileNotFoundError, match="nope.gz"):
        fm.read_idx(tmp_path / "nope.gz", 3)


def test_full_source_reads_debian_layout(tmp_path):
    root = fake_debian(tmp_path)
    images, labels = fm.load_fashion_mnist("train", "full", root)
    assert images.shape == (60, 28, 28) and labels.tolist() == list(range(10)) * 6
    assert images[13, 0, 0] == 31
    images, _ = fm.load_fashion_mnist("test", "auto", root)
    assert len(images) == 30


def test_source_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        fm.load_fashion_mnist("train", "full", tmp_path)
    images, _ = fm.load_fashion_mnist("test", "auto", tmp_path)
    assert len(images) == 2000
    with pytest.raises(ValueError, match="source must be one of"):
        fm.load_fashion_mnist("train", "web")
    with pytest.raises(ValueError, match="split must be one of"):
        fm.load_fashion_mnist("val")


def test_select_balanced(tmp_path):
    labels = np.repeat(np.arange(10), 7)[::-1].copy()
    index = fm.select_balanced(labels, 3, seed=5)
    assert np.bincount(labels[index]).tolist() == [3] * 10
    assert np.all(np.diff(index) > 0)
    np.testing.assert_array_equal(index, fm.select_balanced(labels, 3, seed=5))
    assert not np.array_equal(index, fm.select_balanced(labels, 3, seed=6))
    with pytest.raises(ValueError, match="fewer than 8"):
        fm.select_balanced(labels, 8, seed=0)


@pytest.mark.skipif(
    not fm.full_set_available(),
    reason="Debian dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
def test_rebuild_from_debian_files_is_identical(tmp_path):
    script = Path(__file__).parents[2] / "scripts" / "build_embedded_data.py"
    spec = importlib.util.spec_from_file_location("build_embedded_data", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    out = tmp_path / "rebuilt.npz"
    assert module.main(["--out", str(out)]) == 0
    assert out.read_bytes() == fm.embedded_path().read_bytes()
    full, _ = fm.load_fashion_mnist("test", "full")
    with np.load(out) as npz:
        np.testing.assert_array_equal(npz["test_images"], full[npz["test_index"]])


def test_dense_task_on_full_source(tmp_path):
    from hrnas.data import build_dataset

    root = fake_debian(tmp_path)
    ds = build_dataset("fashion-seg", "test", source="full", root=root, count=5, size=32)
    placed = ds.item_index[ds.item_index >= 0]
    assert placed.max() < 30  # the fake t10k has 30 items
    greys = set(np.unique(ds.batch(range(5))["image"].mul(255).round().numpy()).tolist())
    assert greys <= {0.0} | {float(10 * c + k) for c in range(10) for k in range(3)}
