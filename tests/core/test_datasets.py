"""Data sets: each loader on small files written here in the exact format; bad paths are one line."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest

from samenet import datasets, zoo
from samenet.cli import main
from samenet.datasets import DataError


def write_idx(path, array, compress=False):
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    data = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(path, "wb") as f:
            f.write(data)
    else:
        path.write_bytes(data)


@pytest.fixture
def mnist_dir(tmp_path):
    rng = np.random.default_rng(0)
    for prefix, n, gz in (("train", 12, True), ("t10k", 5, False)):
        suffix = ".gz" if gz else ""
        write_idx(tmp_path / f"{prefix}-images-idx3-ubyte{suffix}", rng.integers(0, 256, (n, 28, 28)), gz)
        write_idx(tmp_path / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n) % 10, gz)
    return tmp_path


def test_mnist_idx_gzipped_and_plain(mnist_dir):
    ds = datasets.mnist(mnist_dir, (1, 32, 32), resize="pad")
    assert ds.x_train.shape == (12, 1, 32, 32) and ds.x_test.shape == (5, 1, 32, 32)
    assert ds.y_train.tolist() == [i % 10 for i in range(12)]
    assert ds.x_train.dtype == np.float32
    assert abs(float(ds.x_train.mean())) < 1e-5 and abs(float(ds.x_train.std()) - 1) < 1e-3
    assert np.all(ds.x_train[:, :, :2, :] == ds.x_train[0, 0, 0, 0])  # the 2-pixel pad is one value


def test_mnist_malformed(tmp_path, mnist_dir):
    bad = mnist_dir / "t10k-labels-idx1-ubyte"
    bad.write_bytes(b"\x00\x00\x08\x01" + struct.pack(">I", 99) + b"\x01\x02")
    with pytest.raises(DataError, match="2 bytes of data for dimensions"):
        datasets.mnist(mnist_dir, (1, 28, 28))
    (mnist_dir / "t10k-labels-idx1-ubyte").write_bytes(b"PK\x03\x04garbage")
    with pytest.raises(DataError, match="bad magic number"):
        datasets.mnist(mnist_dir, (1, 28, 28))
    with pytest.raises(DataError, match="no such folder"):
        datasets.mnist(tmp_path / "nowhere", (1, 28, 28))


def test_cifar10_binary(tmp_path):
    rng = np.random.default_rng(1)
    for name, n in (("data_batch_1.bin", 6), ("data_batch_2.bin", 4), ("test_batch.bin", 3)):
        labels = np.arange(n) % 10
        pixels = rng.integers(0, 256, (n, 3072))
        np.concatenate([labels[:, None], pixels], axis=1).astype(np.uint8).tofile(tmp_path / name)
    ds = datasets.cifar10(tmp_path, (3, 32, 32))
    assert ds.x_train.shape == (10, 3, 32, 32) and ds.y_train.tolist() == [0, 1, 2, 3, 4, 5, 0, 1, 2, 3]
    assert ds.x_test.shape == (3, 3, 32, 32)
    (tmp_path / "test_batch.bin").write_bytes(b"\x00" * 100)
    with pytest.raises(DataError, match="not a whole number of 3073-byte"):
        datasets.cifar10(tmp_path, (3, 32, 32))


def test_cifar10_refuses_the_pickled_version(tmp_path):
    (tmp_path / "data_batch_1").write_bytes(b"\x80\x04pickle")
    with pytest.raises(DataError, match="binary version of CIFAR-10"):
        datasets.cifar10(tmp_path, (3, 32, 32))


def test_image_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(2)
    for split in ("train", "val"):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(2):
                img = Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8))
                img.save(tmp_path / split / cls / f"{i}.{'png' if i else 'jpg'}")
    ds = datasets.folder(tmp_path, (3, 32, 32))
    assert ds.x_train.shape == (4, 3, 32, 32) and ds.classes == 2
    assert ds.y_train.tolist() == [0, 0, 1, 1]
    (tmp_path / "val" / "dog" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="broken.png: not a readable image"):
        datasets.folder(tmp_path, (3, 32, 32))
    with pytest.raises(DataError, match="missing train/"):
        datasets.folder(tmp_path / "val", (3, 32, 32))


def test_digits_fitted_to_lenet():
    ir = zoo.load("lenet5")
    ds = datasets.load("digits", ir)
    assert ds.x_train.shape[1:] == (1, 32, 32) and ds.classes == 10
    assert len(ds.y_train) + len(ds.y_test) == 1797
    rgb = datasets.load("digits", zoo.load("resnet18", (3, 64, 64), {"classes": 10}, check=False))
    assert rgb.x_train.shape[1:] == (3, 64, 64)
    assert np.array_equal(rgb.x_train[:, 0], rgb.x_train[:, 2])


def test_batches_are_seeded_and_identical():
    x, y = np.arange(20.0).reshape(10, 2), np.arange(10)
    a = [yb.tolist() for _, yb in datasets.batches(x, y, 3, seed=4, epoch=1)]
    b = [yb.tolist() for _, yb in datasets.batches(x, y, 3, seed=4, epoch=1)]
    c = [yb.tolist() for _, yb in datasets.batches(x, y, 3, seed=4, epoch=2)]
    assert a == b and a != c and len(a) == 3  # the partial batch is dropped


def test_too_many_classes_and_unknown_sets():
    assert datasets.load("digits", zoo.load("resnet18")).classes == 10  # fewer classes than outputs is fine
    with pytest.raises(DataError, match="outputs 5"):
        datasets.load("digits", zoo.load("lenet5", overrides={"classes": 5}))
    with pytest.raises(DataError, match="unknown data set"):
        datasets.load("imagenet", zoo.load("lenet5"))
    with pytest.raises(DataError, match="needs a path"):
        datasets.load("mnist", zoo.load("lenet5"))


def test_train_command_bad_data_path_is_one_line(capsys, tmp_path):
    rc = main(["train", "--backends", "numpy", "--data", f"mnist:{tmp_path}/none", "--epochs", "1",
               "--results", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no such folder" in err[0]


def test_train_command_runs_and_records_curves(capsys, tmp_path):
    from samenet.results import load

    rc = main(["train", "--backends", "numpy", "--data", "synthetic", "--epochs", "2", "--batch-size", "64",
               "--seeds", "0", "--results", str(tmp_path)])
    assert rc == 0
    df = load(tmp_path, "train")
    row = df.iloc[0]
    assert row["epochs_done"] == 2 and len(row["test_acc"]) == 2 and len(row["step_loss"][0]) == 512 // 64
    assert "agreement across backends" in capsys.readouterr().out


def test_train_jobs_run_side_by_side_to_the_same_results(capsys, tmp_path):
    from samenet.results import load

    common = ["train", "--backends", "numpy", "--data", "synthetic", "--epochs", "1", "--batch-size", "64",
              "--seeds", "0,1", "--threads", "2"]
    assert main([*common, "--jobs", "1", "--results", str(tmp_path / "one")]) == 0
    assert main([*common, "--jobs", "2", "--results", str(tmp_path / "two")]) == 0
    assert "runs shared the cores" in capsys.readouterr().out
    one, two = (load(tmp_path / d, "train").sort_values("seed") for d in ("one", "two"))
    assert list(two["jobs"]) == [2, 2] and list(two["threads"]) == [1, 1]
    assert list(one["final_test_acc"]) == list(two["final_test_acc"])
    # One BLAS thread against two sums float32 products in another order: equal to rounding, not
    # to the bit (seen: 2.2942097 against 2.2942100 at the eighth step).
    for a, b in zip(one["step_loss"], two["step_loss"]):
        np.testing.assert_allclose(a[0], b[0], rtol=1e-5)
    assert one["step_loss"].iloc[0][0] != one["step_loss"].iloc[1][0], "two seeds: two different runs"
