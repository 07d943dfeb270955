"""Fashion-MNIST: the subset shipped inside the package, and the full set from the Debian files.

Source: Zalando Research, Fashion-MNIST (https://github.com/zalandoresearch/fashion-mnist),
licence MIT (Debian's copyright file names it "Expat"), as packaged by Debian in
``dataset-fashion-mnist`` (``apt-get install dataset-fashion-mnist`` puts the four IDX gz files in
``/usr/share/datasets/fashion-mnist/``). 60,000 train and 10,000 test (t10k) images, 28x28 uint8
grey levels, 10 balanced classes.

The embedded subset ``fashion_mnist_subset.npz`` holds 800 train images per class drawn from the
train split and 200 test images per class drawn from t10k, with their indices in those splits.
``scripts/build_embedded_data.py`` rebuilds it byte for byte from the Debian files; its SHA-256 is
recorded here and checked on every load.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np

CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
IMAGE_SIZE = 28
DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
# IDX file names of the two splits (images, labels).
IDX_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
EMBEDDED_FILE = "fashion_mnist_subset.npz"
EMBEDDED_PER_CLASS = {"train": 800, "test": 200}
EMBEDDED_SEED = 20210601
# SHA-256 of the shipped npz, as printed by scripts/build_embedded_data.py.
EMBEDDED_SHA256 = "1810a81cde31de2c01812e7f9f5e9b655969b8052dc0fccb8bdf7fcaf8143dc7"

SPLITS = ("train", "test")
SOURCES = ("embedded", "full", "auto")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Fashion-MNIST split must be one of {SPLITS}, got {split!r}")


def read_idx(path: str | Path, ndim: int) -> np.ndarray:
    """Read one gzipped IDX file of uint8 data: ``[N, 28, 28]`` images (``ndim=3``) or ``[N]``
    labels (``ndim=1``). The header is a magic number ``0x0000 08 <ndim>`` (08 = unsigned byte)
    followed by ``ndim`` big-endian int32 sizes."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Fashion-MNIST IDX file not found: {path}")
    raw = gzip.open(path).read()
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: {len(raw)} bytes, shorter than an IDX header of {header}")
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x0800 + ndim:
        raise ValueError(
            f"{path}: IDX magic {magic:#x}, expected {0x0800 + ndim:#x} (uint8, {ndim}-d)"
        )
    dims = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, np.uint8, offset=header)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header says {dims}, payload has {data.size} bytes")
    return data.reshape(dims)


def load_debian_split(split: str, root: str | Path = DEBIAN_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """The full split from the Debian IDX files: (images ``[N, 28, 28]`` uint8, labels ``[N]``
    uint8), N = 60,000 (train) or 10,000 (test)."""
    _check_split(split)
    image_file, label_file = IDX_FILES[split]
    images = read_idx(Path(root) / image_file, 3)
    labels = read_idx(Path(root) / label_file, 1)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE) or len(images) != len(labels):
        raise ValueError(
            f"{root}: {split} images {images.shape} and labels {labels.shape} do not match"
        )
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{root}: {split} labels reach {labels.max()}, expected < {len(CLASSES)}")
    return images, labels


def full_set_available(root: str | Path = DEBIAN_ROOT) -> bool:
    return all((Path(root) / f).is_file() for pair in IDX_FILES.values() for f in pair)


def embedded_path() -> Path:
    return Path(str(resources.files("hrnas.data") / EMBEDDED_FILE))


def sha256_file(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def select_balanced(labels: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """Sorted indices of ``per_class`` items of each class. Within a class, items are ranked by
    uniform keys from ``PCG64(seed)`` (one key per item, in index order): the bit generator's
    stream is fixed across NumPy versions, so the selection is too."""
    keys = np.random.Generator(np.random.PCG64(seed)).random(len(labels))
    chosen = []
    for c in range(len(CLASSES)):
        members = np.flatnonzero(labels == c)
        if len(members) < per_class:
            raise ValueError(f"class {c} has {len(members)} items, fewer than {per_class}")
        chosen.append(members[np.argsort(keys[members], kind="stable")[:per_class]])
    return np.sort(np.concatenate(chosen))


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """An ``.npz`` that ``np.load`` reads, written byte-reproducibly: fixed entry order and
    timestamps (``np.savez_compressed`` stamps each entry with the current time)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=9) as zf:
        for name in sorted(arrays):
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arrays[name]), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue(), compresslevel=9)


def build_subset(root: str | Path = DEBIAN_ROOT) -> dict[str, np.ndarray]:
    """The arrays of the embedded subset, from the Debian files under ``root``."""
    arrays = {}
    for split in SPLITS:
        images, labels = load_debian_split(split, root)
        index = select_balanced(labels, EMBEDDED_PER_CLASS[split], EMBEDDED_SEED)
        arrays[f"{split}_images"] = images[index]
        arrays[f"{split}_labels"] = labels[index]
        arrays[f"{split}_index"] = index.astype(np.int32)
    return arrays


def _expected_layout(split: str) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    n = EMBEDDED_PER_CLASS[split] * len(CLASSES)
    return {
        f"{split}_images": ((n, IMAGE_SIZE, IMAGE_SIZE), np.dtype(np.uint8)),
        f"{split}_labels": ((n,), np.dtype(np.uint8)),
        f"{split}_index": ((n,), np.dtype(np.int32)),
    }


def load_embedded_split(
    split: str, path: str | Path | None = None, sha256: str | None = EMBEDDED_SHA256
) -> tuple[np.ndarray, np.ndarray]:
    """The embedded subset's split: (images ``[N, 28, 28]`` uint8, labels ``[N]`` uint8),
    N = 8,000 (train) or 2,000 (test). Checks the file's SHA-256 (unless ``sha256`` is None) and
    every array's shape and dtype."""
    _check_split(split)
    path = embedded_path() if path is None else Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"embedded Fashion-MNIST file missing: {path} (rebuild it with "
            "scripts/build_embedded_data.py)"
        )
    if sha256 is not None and sha256_file(path) != sha256:
        raise ValueError(
            f"{path}: SHA-256 {sha256_file(path)} differs from the recorded {sha256}; the file is "
            "damaged or was rebuilt without updating EMBEDDED_SHA256"
        )
    with np.load(path, allow_pickle=False) as npz:
        out = {}
        for key, (shape, dtype) in _expected_layout(split).items():
            if key not in npz.files:
                raise ValueError(f"{path}: array {key!r} missing (has {sorted(npz.files)})")
            arr = npz[key]
            if arr.shape != shape or arr.dtype != dtype:
                raise ValueError(
                    f"{path}: {key} is {arr.dtype}{list(arr.shape)}, expected {dtype}{list(shape)}"
                )
            out[key] = arr
    labels = out[f"{split}_labels"]
    if labels.max() >= len(CLASSES):
        raise ValueError(f"{path}: {split} labels reach {labels.max()}, expected < {len(CLASSES)}")
    return out[f"{split}_images"], labels


def load_fashion_mnist(
    split: str, source: str = "embedded", root: str | Path = DEBIAN_ROOT
) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images ``[N, 28, 28]`` uint8 and labels ``[N]`` uint8 of ``split``
    ("train" or "test" = t10k).

    ``source``: "embedded" (the subset in the package), "full" (the Debian IDX files under
    ``root``; an error if absent) or "auto" (full when present, else embedded)."""
    _check_split(split)
    if source not in SOURCES:
        raise ValueError(f"Fashion-MNIST source must be one of {SOURCES}, got {source!r}")
    if source == "auto":
        source = "full" if full_set_available(root) else "embedded"
    if source == "full":
        if not full_set_available(root):
            raise FileNotFoundError(
                f"full Fashion-MNIST not found in {root}: install the Debian package "
                "dataset-fashion-mnist or pass root= to the folder holding the IDX gz files"
            )
        return load_debian_split(split, root)
    return load_embedded_split(split)
