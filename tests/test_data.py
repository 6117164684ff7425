"""Dataset readers: digits, and CIFAR-10 / MNIST / imagefolder on tiny fixtures in real formats."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from toolkit.data import DATASETS, ArrayDataset, DatasetError, list_datasets, load_dataset


def raw_pixels(ds: ArrayDataset) -> np.ndarray:
    """Undo the normalisation: back to the [0, 1] scale."""
    mean = np.asarray(ds.mean, dtype=np.float64)[None, :, None, None]
    std = np.asarray(ds.std, dtype=np.float64)[None, :, None, None]
    return ds.x.astype(np.float64) * std + mean


# --------------------------------------------------------------------------- registry


def test_registry_lists_every_reader():
    assert list_datasets() == ["cifar10", "digits", "digits-hard", "imagefolder", "mnist"]
    assert not DATASETS["digits"].needs_root
    assert all(DATASETS[n].needs_root for n in ("cifar10", "mnist", "imagefolder"))


def test_unknown_name_lists_valid_names():
    with pytest.raises(DatasetError, match=r"unknown dataset 'imagenet'.*cifar10, digits"):
        load_dataset("imagenet")


def test_unknown_split():
    with pytest.raises(DatasetError, match=r"unknown split 'validation'.*train, test"):
        load_dataset("digits", split="validation")


@pytest.mark.parametrize("channels", [0, 2, 4, True])
def test_bad_channels(channels):
    with pytest.raises(DatasetError, match="channels must be None, 1 or 3"):
        load_dataset("digits", channels=channels)


@pytest.mark.parametrize("name", ["cifar10", "mnist", "imagefolder"])
def test_missing_root_says_which_layout(name):
    with pytest.raises(
        DatasetError,
        match=rf"dataset '{name}' needs its files: pass root=.*--data-root.*expected layout",
    ):
        load_dataset(name)


def test_root_that_does_not_exist(tmp_path):
    with pytest.raises(DatasetError, match=r"root folder .*nowhere does not exist"):
        load_dataset("mnist", root=tmp_path / "nowhere")


# --------------------------------------------------------------------------- digits


def test_digits_shapes_and_types():
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    assert train.x.shape == (1347, 1, 32, 32) and test.x.shape == (450, 1, 32, 32)
    assert train.x.dtype == np.float32 and train.y.dtype == np.int64
    assert (len(train), train.num_classes, train.in_channels, train.image_size) == (1347, 10, 1, 32)
    assert train.classes == tuple("0123456789")
    assert set(np.unique(train.y)) == set(range(10)) == set(np.unique(test.y))


def test_digits_split_is_fixed_and_stratified():
    from sklearn.datasets import load_digits

    first, again = load_dataset("digits", split="test"), load_dataset("digits", split="test")
    np.testing.assert_array_equal(first.x, again.x)
    np.testing.assert_array_equal(first.y, again.y)
    train = load_dataset("digits")
    full = np.bincount(load_digits().target, minlength=10)
    np.testing.assert_array_equal(np.bincount(train.y) + np.bincount(first.y), full)
    # Stratified: every class keeps its share of the test set to within one item.
    assert np.all(np.abs(np.bincount(first.y) - full * 0.25) <= 1)


def test_digits_normalised_with_train_statistics():
    train = load_dataset("digits")
    test = load_dataset("digits", split="test")
    assert abs(float(train.x.mean())) < 1e-5
    assert abs(float(train.x.std()) - 1.0) < 1e-4
    assert test.mean == train.mean and test.std == train.std
    assert 0.0 < train.mean[0] < 1.0


def test_digits_upsampling_is_exact_repetition():
    small = load_dataset("digits", image_size=8)
    big = load_dataset("digits")
    assert small.x.shape == (1347, 1, 8, 8)
    np.testing.assert_allclose(raw_pixels(big)[:, :, ::4, ::4], raw_pixels(small), atol=1e-6)
    np.testing.assert_array_equal(big.x[:, :, 1::4, 2::4], big.x[:, :, ::4, ::4])
    # The 8x8 digits take 17 levels, 0..16, divided by 16.
    levels = np.unique(np.round(raw_pixels(small) * 16, 4))
    np.testing.assert_allclose(levels, np.arange(17), atol=1e-3)


def test_digits_channels_3_replicates_gray():
    rgb = load_dataset("digits", channels=3, image_size=16)
    assert rgb.x.shape == (1347, 3, 16, 16) and rgb.in_channels == 3
    assert len(rgb.mean) == len(rgb.std) == 3
    np.testing.assert_array_equal(rgb.x[:, 0], rgb.x[:, 2])


def test_digits_image_size_must_be_multiple_of_8():
    with pytest.raises(DatasetError, match="multiple of 8"):
        load_dataset("digits", image_size=28)


def test_digits_cache_cannot_be_corrupted():
    ds = load_dataset("digits", image_size=8)
    ds.x[:] = 123.0
    assert load_dataset("digits", image_size=8).x.max() < 10


# --------------------------------------------------------------------------- CIFAR-10

CIFAR_NAMES = [f"class_{k}" for k in range(10)]


def write_cifar(folder: Path, rng: np.random.Generator) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Five train batches of 4 records and a test batch of 3, in the real binary format."""
    folder.mkdir(parents=True)
    written = {}
    files = [f"data_batch_{i}.bin" for i in range(1, 6)] + ["test_batch.bin"]
    for file in files:
        n = 3 if file == "test_batch.bin" else 4
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        pixels = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
        records = np.concatenate([labels[:, None], pixels.reshape(n, -1)], axis=1)
        (folder / file).write_bytes(records.tobytes())
        written[file] = (pixels, labels)
    (folder / "batches.meta.txt").write_text("\n".join(CIFAR_NAMES) + "\n\n")
    return written


@pytest.fixture
def cifar(tmp_path):
    written = write_cifar(tmp_path / "cifar-10-batches-bin", np.random.default_rng(0))
    train_pixels = np.concatenate([written[f"data_batch_{i}.bin"][0] for i in range(1, 6)])
    train_labels = np.concatenate([written[f"data_batch_{i}.bin"][1] for i in range(1, 6)])
    return tmp_path, (train_pixels, train_labels), written["test_batch.bin"]


@pytest.mark.parametrize("subfolder", [False, True])
def test_cifar10_decodes_exact_pixels_and_labels(cifar, subfolder):
    root, (train_pixels, train_labels), (test_pixels, test_labels) = cifar
    if subfolder:
        root = root / "cifar-10-batches-bin"
    train = load_dataset("cifar10", root=root)
    test = load_dataset("cifar10", split="test", root=str(root))
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (3, 3, 32, 32)
    assert train.classes == tuple(CIFAR_NAMES) and test.num_classes == 10
    np.testing.assert_array_equal(train.y, train_labels)
    np.testing.assert_array_equal(test.y, test_labels)
    np.testing.assert_allclose(raw_pixels(train) * 255, train_pixels, atol=1e-3)
    np.testing.assert_allclose(raw_pixels(test) * 255, test_pixels, atol=1e-3)
    expected_mean = (train_pixels / 255.0).mean(axis=(0, 2, 3))
    np.testing.assert_allclose(test.mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(train.x.mean(axis=(0, 2, 3)), 0, atol=1e-5)


def test_cifar10_gray_and_resize(cifar):
    root, (train_pixels, _), _ = cifar
    gray = load_dataset("cifar10", root=root, channels=1, image_size=16)
    assert gray.x.shape == (20, 1, 16, 16)
    luma = np.einsum("nchw,c->nhw", train_pixels[:, :, ::2, ::2] / 255.0, [0.299, 0.587, 0.114])
    np.testing.assert_allclose(raw_pixels(gray)[:, 0], luma, atol=1e-5)


def test_cifar10_default_class_names_without_meta(cifar):
    root, *_ = cifar
    (root / "cifar-10-batches-bin" / "batches.meta.txt").unlink()
    ds = load_dataset("cifar10", root=root)
    assert ds.classes[0] == "airplane" and ds.classes[9] == "truck"


def test_cifar10_pickle_version_is_refused(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    (folder / "data_batch_1").write_bytes(b"\x80\x04not really a pickle")
    for root in (tmp_path, folder):
        with pytest.raises(DatasetError, match=r"pickled.*not read for safety.*cifar-10-binary"):
            load_dataset("cifar10", root=root)


def test_cifar10_empty_folder_explains_layout(tmp_path):
    with pytest.raises(DatasetError, match=r"no CIFAR-10 binary batches.*cifar-10-binary.tar.gz"):
        load_dataset("cifar10", root=tmp_path)


def test_cifar10_missing_and_truncated_files(cifar):
    root, *_ = cifar
    folder = root / "cifar-10-batches-bin"
    (folder / "test_batch.bin").unlink()
    with pytest.raises(DatasetError, match=r"missing CIFAR-10 file .*test_batch\.bin"):
        load_dataset("cifar10", split="test", root=root)
    batch = folder / "data_batch_3.bin"
    batch.write_bytes(batch.read_bytes()[:-10])
    with pytest.raises(DatasetError, match=r"data_batch_3\.bin is truncated"):
        load_dataset("cifar10", root=root)


# --------------------------------------------------------------------------- MNIST


def idx_bytes(array: np.ndarray) -> bytes:
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(folder: Path, compress: bool, rng: np.random.Generator) -> dict[str, np.ndarray]:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (5, 28, 28)),
        "train-labels-idx1-ubyte": np.array([3, 1, 4, 1, 5]),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (3, 28, 28)),
        "t10k-labels-idx1-ubyte": np.array([9, 2, 6]),
    }
    for name, array in arrays.items():
        data = idx_bytes(array)
        if compress:
            (folder / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (folder / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("compress", [False, True])
@pytest.mark.parametrize("nested", [False, True])
def test_mnist_decodes_exactly(tmp_path, compress, nested):
    folder = tmp_path / "MNIST" / "raw" if nested else tmp_path
    arrays = write_mnist(folder, compress, np.random.default_rng(1))
    train = load_dataset("mnist", root=tmp_path)
    test = load_dataset("mnist", split="test", root=tmp_path)
    assert train.x.shape == (5, 1, 28, 28) and test.x.shape == (3, 1, 28, 28)
    assert train.classes == tuple("0123456789")
    np.testing.assert_array_equal(train.y, [3, 1, 4, 1, 5])
    np.testing.assert_array_equal(test.y, [9, 2, 6])
    np.testing.assert_allclose(
        raw_pixels(train)[:, 0] * 255, arrays["train-images-idx3-ubyte"], atol=1e-3
    )
    np.testing.assert_allclose(
        raw_pixels(test)[:, 0] * 255, arrays["t10k-images-idx3-ubyte"], atol=1e-3
    )


def test_mnist_resize_and_rgb(tmp_path):
    arrays = write_mnist(tmp_path, False, np.random.default_rng(2))
    ds = load_dataset("mnist", root=tmp_path, image_size=32, channels=3)
    assert ds.x.shape == (5, 3, 32, 32)
    index = np.arange(32) * 28 // 32
    expected = arrays["train-images-idx3-ubyte"][:, index[:, None], index[None, :]]
    np.testing.assert_allclose(raw_pixels(ds)[:, 1] * 255, expected, atol=1e-3)


def test_mnist_bad_magic(tmp_path):
    write_mnist(tmp_path, False, np.random.default_rng(3))
    path = tmp_path / "train-labels-idx1-ubyte"
    path.write_bytes(b"\x00\x00\x08\x03" + path.read_bytes()[4:])
    with pytest.raises(DatasetError, match=r"train-labels-idx1-ubyte has IDX magic 0x00000803"):
        load_dataset("mnist", root=tmp_path)


def test_mnist_truncated_file(tmp_path):
    write_mnist(tmp_path, True, np.random.default_rng(4))
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-100]))
    with pytest.raises(DatasetError, match=r"t10k-images-idx3-ubyte is truncated"):
        load_dataset("mnist", split="test", root=tmp_path)


def test_mnist_missing_files(tmp_path):
    with pytest.raises(DatasetError, match=r"no MNIST files \(train-images-idx3-ubyte"):
        load_dataset("mnist", root=tmp_path)
    write_mnist(tmp_path, False, np.random.default_rng(5))
    (tmp_path / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetError, match=r"missing MNIST file .*t10k-labels-idx1-ubyte"):
        load_dataset("mnist", split="test", root=tmp_path)


# --------------------------------------------------------------------------- imagefolder

COLOURS = {"cat": (255, 0, 0), "dog": (0, 255, 0), "emu": (0, 0, 255)}


def write_images(folder: Path, per_class: dict[str, int]) -> None:
    from PIL import Image

    for name, count in per_class.items():
        (folder / name).mkdir(parents=True)
        for i in range(count):
            Image.new("RGB", (10, 7), COLOURS[name]).save(folder / name / f"{i}.png")
        (folder / name / "notes.txt").write_text("not an image")


def test_imagefolder_flat_layout_is_split_75_25(tmp_path):
    write_images(tmp_path, {"cat": 4, "dog": 4, "emu": 8})
    train = load_dataset("imagefolder", root=tmp_path)
    test = load_dataset("imagefolder", split="test", root=tmp_path)
    assert train.classes == ("cat", "dog", "emu") == test.classes
    assert train.x.shape == (12, 3, 32, 32) and test.x.shape == (4, 3, 32, 32)
    np.testing.assert_array_equal(np.bincount(train.y), [3, 3, 6])
    np.testing.assert_array_equal(np.bincount(test.y), [1, 1, 2])
    for ds in (train, test):
        colours = np.asarray([COLOURS[ds.classes[k]] for k in ds.y])[:, :, None, None]
        np.testing.assert_allclose(
            raw_pixels(ds) * 255, np.broadcast_to(colours, ds.x.shape), atol=1e-3
        )
    again = load_dataset("imagefolder", split="test", root=tmp_path)
    np.testing.assert_array_equal(again.x, test.x)


def test_imagefolder_gray_and_size(tmp_path):
    write_images(tmp_path, {"cat": 2, "dog": 2})
    ds = load_dataset("imagefolder", root=tmp_path, channels=1, image_size=12)
    assert ds.x.shape == (2, 1, 12, 12)
    expected = {0: 0.299, 1: 0.587}
    for image, label in zip(raw_pixels(ds), ds.y, strict=True):
        assert np.allclose(image, expected[int(label)], atol=1 / 255)


@pytest.mark.parametrize("test_name", ["test", "val"])
def test_imagefolder_train_test_folders(tmp_path, test_name):
    write_images(tmp_path / "train", {"cat": 2, "dog": 3, "emu": 1})
    write_images(tmp_path / test_name, {"dog": 2, "emu": 1})
    train = load_dataset("imagefolder", root=tmp_path, image_size=8)
    test = load_dataset("imagefolder", split="test", root=tmp_path, image_size=8)
    assert train.classes == test.classes == ("cat", "dog", "emu")
    np.testing.assert_array_equal(train.y, [0, 0, 1, 1, 1, 2])
    np.testing.assert_array_equal(test.y, [1, 1, 2])
    assert test.x.shape == (3, 3, 8, 8) and test.mean == train.mean


def test_imagefolder_errors(tmp_path):
    with pytest.raises(DatasetError, match=r"no class subfolders in .*expected <root>/<class>"):
        load_dataset("imagefolder", root=tmp_path)
    write_images(tmp_path, {"cat": 2})
    (tmp_path / "dog").mkdir()
    with pytest.raises(DatasetError, match=r"class folder .*dog has no images"):
        load_dataset("imagefolder", root=tmp_path)
    (tmp_path / "dog" / "0.png").write_bytes(b"not a png")
    with pytest.raises(DatasetError, match=r"cannot read image .*0\.png"):
        load_dataset("imagefolder", root=tmp_path)
