"""Data sets, loaded without any download, made into identical numpy arrays for every backend.

* ``digits``: scikit-learn's bundled 8x8 handwritten digits (real data, offline), fitted to the
  network's input as its spec's ``data`` section says (``pad``: centred in the input;
  ``upsample``: nearest-neighbour by the largest whole factor that fits, then centred;
  ``channels: repeat`` copies the grey channel to RGB);
* ``mnist:PATH``: the idx files of MNIST (``train-images-idx3-ubyte`` etc., gzipped or not);
* ``cifar10:PATH``: CIFAR-10's binary version (``data_batch_1.bin`` ... ``test_batch.bin``),
  never the pickled one (unpickling a file runs code);
* ``folder:PATH``: ImageNet-style ``PATH/train/<class>/*.jpg|png`` and ``PATH/val/<class>/...``
  read with Pillow, shorter side resized to the input then centre-cropped;
* ``synthetic``: seeded Gaussian images and uniform labels.

The harness owns the data: pixels are scaled to [0, 1], then standardised per channel with
the training set's mean and standard deviation, and ``batches`` yields numpy batches in a
seeded order per epoch, so every backend sees the same bytes in the same order. A missing
or malformed data path is a one-line error.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from .errors import HarnessError


class DataError(HarnessError):
    """A data set path is missing or its files are malformed."""


@dataclass
class Dataset:
    """Arrays ready for training: x float32 (N, C, H, W), y int64 (N,)."""

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    classes: int

    def save(self, path: Path) -> Path:
        np.savez(path, x_train=self.x_train, y_train=self.y_train, x_test=self.x_test, y_test=self.y_test,
                 classes=np.array(self.classes), name=np.array(self.name))
        return path

    @classmethod
    def load(cls, path: Path) -> "Dataset":
        with np.load(path, allow_pickle=False) as f:
            return cls(str(f["name"]), f["x_train"], f["y_train"], f["x_test"], f["y_test"], int(f["classes"]))


# --------------------------------------------------------------------------- fitting to the input


def fit(images: np.ndarray, shape: tuple[int, int, int], resize: str = "upsample") -> np.ndarray:
    """(N, c, h, w) float images -> (N, C, H, W): resize, centre, repeat channels."""
    n, c, h, w = images.shape
    C, H, W = shape
    if c not in (1, C):
        raise DataError(f"cannot fit {c}-channel images to {C} input channels")
    if resize == "upsample":
        k = max(1, min(H // h, W // w))
        images = images.repeat(k, axis=2).repeat(k, axis=3)
        h, w = h * k, w * k
    if h > H or w > W:
        top, left = (h - H) // 2, (w - W) // 2
        images = images[:, :, top : top + min(h, H), left : left + min(w, W)]
        h, w = images.shape[2:]
    out = np.zeros((n, c, H, W), dtype=np.float32)
    top, left = (H - h) // 2, (W - w) // 2
    out[:, :, top : top + h, left : left + w] = images
    return np.repeat(out, C, axis=1) if c == 1 and C > 1 else out


def standardise(train: np.ndarray, test: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel standardisation with the training set's statistics."""
    mean = train.mean(axis=(0, 2, 3), keepdims=True, dtype=np.float64)
    std = train.std(axis=(0, 2, 3), keepdims=True, dtype=np.float64) + 1e-7
    return ((train - mean) / std).astype(np.float32), ((test - mean) / std).astype(np.float32)


def _split(x, y, test_fraction: float, seed: int):
    order = np.random.default_rng(seed).permutation(len(y))
    n_test = int(round(len(y) * test_fraction))
    test, train = order[:n_test], order[n_test:]
    return x[train], y[train], x[test], y[test]


# --------------------------------------------------------------------------- sources


def digits(shape, resize="upsample", test_fraction=0.2, split_seed=0) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("the digits data set needs scikit-learn (pip install scikit-learn)") from None
    d = load_digits()
    x = (d.images.astype(np.float32) / 16.0)[:, None]
    xtr, ytr, xte, yte = _split(x, d.target.astype(np.int64), test_fraction, split_seed)
    xtr, xte = standardise(fit(xtr, shape, resize), fit(xte, shape, resize))
    return Dataset("digits", xtr, ytr, xte, yte, 10)


def _open(path: Path):
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def read_idx(path: Path) -> np.ndarray:
    """An idx file (MNIST's format): magic, dimensions, then unsigned bytes."""
    try:
        with _open(path) as f:
            data = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise DataError(f"{path}: not an idx file of unsigned bytes (bad magic number)")
    ndim = data[3]
    if len(data) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated idx header")
    dims = struct.unpack(f">{ndim}I", data[4 : 4 + 4 * ndim])
    body = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if body.size != int(np.prod(dims)):
        raise DataError(f"{path}: {body.size} bytes of data for dimensions {dims}")
    return body.reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise DataError(f"{root}: missing {stem}[.gz]")


def mnist(root: Path, shape, resize="pad") -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected MNIST's idx files)")
    parts = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise DataError(f"{root}: {prefix} images {images.shape} and labels {labels.shape} do not match")
        parts[split] = (images.astype(np.float32)[:, None] / 255.0, labels.astype(np.int64))
    xtr, xte = standardise(fit(parts["train"][0], shape, resize), fit(parts["test"][0], shape, resize))
    return Dataset("mnist", xtr, parts["train"][1], xte, parts["test"][1], 10)


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """A CIFAR-10 binary batch: records of 1 label byte + 3072 pixel bytes (R, G, B planes)."""
    try:
        data = np.fromfile(path, dtype=np.uint8)
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e}") from None
    if data.size == 0 or data.size % 3073:
        raise DataError(f"{path}: {data.size} bytes is not a whole number of 3073-byte CIFAR-10 records")
    records = data.reshape(-1, 3073)
    labels = records[:, 0].astype(np.int64)
    if labels.max() > 9:
        raise DataError(f"{path}: label {labels.max()} out of range 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def cifar10(root: Path, shape, resize="upsample") -> Dataset:
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"{root}: no such folder (expected CIFAR-10's binary batches)")
    train_files = sorted(root.glob("data_batch_*.bin"))
    if not train_files:
        raise DataError(f"{root}: no data_batch_*.bin (the binary version of CIFAR-10, not the python one)")
    test_file = root / "test_batch.bin"
    if not test_file.exists():
        raise DataError(f"{root}: missing test_batch.bin")
    train = [read_cifar_batch(p) for p in train_files]
    xtr = np.concatenate([t[0] for t in train]).astype(np.float32) / 255.0
    ytr = np.concatenate([t[1] for t in train])
    xte, yte = read_cifar_batch(test_file)
    xtr, xte = standardise(fit(xtr, shape, resize), fit(xte.astype(np.float32) / 255.0, shape, resize))
    return Dataset("cifar10", xtr, ytr, xte, yte, 10)


IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png"}


def _load_image(path: Path, shape) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    C, H, W = shape
    try:
        with Image.open(path) as img:
            img = img.convert("RGB" if C == 3 else "L")
            scale = max(H / img.height, W / img.width)
            img = img.resize((max(W, round(img.width * scale)), max(H, round(img.height * scale))), Image.BILINEAR)
            left, top = (img.width - W) // 2, (img.height - H) // 2
            arr = np.asarray(img.crop((left, top, left + W, top + H)), dtype=np.float32) / 255.0
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"{path}: not a readable image: {e}") from None
    return arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)


def folder(root: Path, shape) -> Dataset:
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise DataError("image folders need Pillow (pip install pillow)") from None
    root = Path(root)
    splits = {}
    classes = None
    for split in ("train", "val"):
        d = root / split
        if not d.is_dir():
            raise DataError(f"{root}: missing {split}/ (expected {split}/<class>/<image>)")
        names = sorted(p.name for p in d.iterdir() if p.is_dir())
        if not names:
            raise DataError(f"{d}: no class folders")
        if classes is None:
            classes = names
        elif names != classes:
            raise DataError(f"{d}: classes differ from train/: {sorted(set(names) ^ set(classes))}")
        files = [(p, i) for i, c in enumerate(classes) for p in sorted((d / c).iterdir())
                 if p.suffix.lower() in IMAGE_SUFFIXES]
        if not files:
            raise DataError(f"{d}: no .jpg/.png images")
        x = np.stack([_load_image(p, shape) for p, _ in files])
        splits[split] = (x, np.array([i for _, i in files], dtype=np.int64))
    xtr, xte = standardise(splits["train"][0], splits["val"][0])
    return Dataset(f"folder:{root.name}", xtr, splits["train"][1], xte, splits["val"][1], len(classes))


def synthetic(shape, classes: int, n_train: int = 512, n_test: int = 128, seed: int = 0) -> Dataset:
    rng = np.random.default_rng(seed)
    return Dataset("synthetic", rng.standard_normal((n_train, *shape), dtype=np.float32),
                   rng.integers(0, classes, n_train), rng.standard_normal((n_test, *shape), dtype=np.float32),
                   rng.integers(0, classes, n_test), classes)


def load(spec: str, ir) -> Dataset:
    """A data set by name (``digits``, ``synthetic``) or ``kind:PATH`` (mnist, cifar10, folder)."""
    kind, _, path = spec.partition(":")
    data = ir.meta.get("data", {})
    shape = tuple(ir.input_shape)
    classes = int(np.prod(ir.output_shape))
    if kind == "digits":
        ds = digits(shape, data.get("resize", "upsample"))
    elif kind == "synthetic":
        ds = synthetic(shape, classes)
    elif kind in ("mnist", "cifar10", "folder"):
        if not path:
            raise DataError(f"data set '{kind}' needs a path: {kind}:PATH")
        ds = {"mnist": lambda: mnist(Path(path), shape, data.get("resize", "pad")),
              "cifar10": lambda: cifar10(Path(path), shape, data.get("resize", "upsample")),
              "folder": lambda: folder(Path(path), shape)}[kind]()
    else:
        raise DataError(f"unknown data set '{spec}' (digits, synthetic, mnist:PATH, cifar10:PATH, folder:PATH)")
    if ds.classes > classes:
        raise DataError(f"{ds.name} has {ds.classes} classes but {ir.name} outputs {classes} "
                        f"(use --set classes={ds.classes})")
    return ds


def batches(x: np.ndarray, y: np.ndarray, batch: int, seed: int, epoch: int,
            shuffle: bool = True) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Batches in a seeded order per epoch; the last partial batch is dropped when shuffling."""
    order = np.random.default_rng([seed, epoch]).permutation(len(y)) if shuffle else np.arange(len(y))
    stop = len(y) - (len(y) % batch if shuffle else 0)
    for start in range(0, stop, batch):
        idx = order[start : start + batch]
        yield np.ascontiguousarray(x[idx]), y[idx]
