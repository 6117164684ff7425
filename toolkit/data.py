"""Dataset readers that return plain numpy arrays, ready for a binary network.

Every reader returns one :class:`ArrayDataset`: images as float32 ``(N, C, H, W)``, labels as
int64 ``(N,)``, the class names, and the normalisation that was applied. The module imports no
torch, so the same readers serve the laptop (training, search, compression) and a device that
learns on its own data; wrapping the arrays in a torch ``TensorDataset`` is one line for a caller
that has torch.

Readers, all behind one door, :func:`load_dataset`:

``digits``
    scikit-learn's bundled 8x8 handwritten digits (1,797 images, no download). Pixels 0..16 are
    scaled to [0, 1] and upsampled 4x by exact pixel repetition to 32x32, the smallest input the
    ImageNet-style stems of Bi-Real and SoFAr accept. The train/test split is fixed (stratified
    75/25 with ``random_state=0``: 1,347 / 450), so every run and every fleet node sees the same
    test set.
``digits-hard[:n]``
    Harder 32x32 RGB images generated from the same digits (warps, colour, texture, clutter;
    train and test from disjoint source digits), cached on disk: see :mod:`toolkit.digits_hard`.
    ``digits-hard:20000`` asks for 20,000 training images, ``digits-hard:n=5000,seed=1`` for
    another draw; the test set has 2,000 images whatever ``n`` is.
``cifar10``
    The CIFAR-10 *binary* distribution (``cifar-10-binary.tar.gz``). The pickled "python"
    version is refused on purpose: unpickling a downloaded file can run arbitrary code.
``mnist``
    The four IDX files of MNIST (optionally gzipped), as torchvision stores them.
``imagefolder``
    torchvision's ``ImageFolder`` layout, ``root/<class>/<image>``, read with Pillow.

Normalisation convention: pixels are first put on the [0, 1] scale, then every split is
normalised per channel with the mean and standard deviation of the *train* split (after the
channel and size conversions asked for). The statistics are returned with the data
(``ArrayDataset.mean`` / ``std``) so an exported artifact can record them in its manifest and a
device can apply the very same transform to camera frames: ``x = (pixel / 255 - mean) / std``.

Example::

    from toolkit.data import load_dataset

    train = load_dataset("digits")                    # (1347, 1, 32, 32)
    test = load_dataset("digits", split="test", channels=3)
    raw = test.x * np.asarray(test.std)[:, None, None] + np.asarray(test.mean)[:, None, None]
"""

from __future__ import annotations

import functools
import gzip
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType

import numpy as np

from bitfleet.errors import BitfleetError, require

__all__ = [
    "DATASETS",
    "ArrayDataset",
    "DatasetError",
    "DatasetInfo",
    "list_datasets",
    "load_dataset",
]

SPLITS = ("train", "test")
_LUMA = np.asarray([0.299, 0.587, 0.114], dtype=np.float32)  # ITU-R BT.601, as Pillow's "L"


class DatasetError(BitfleetError, ValueError):
    """A dataset could not be read; the message says what was wrong and what to do."""


@dataclass(frozen=True)
class DatasetInfo:
    """What :data:`DATASETS` knows about a reader: a description, and whether it needs ``root``."""

    description: str
    needs_root: bool
    layout: str = ""


@dataclass(frozen=True, eq=False)
class ArrayDataset:
    """Normalised images and labels of one split of one dataset.

    ``x`` is float32 ``(N, C, H, W)``, already normalised per channel with ``mean`` and ``std``
    (statistics of the train split, on the [0, 1] scale); ``y`` is int64 ``(N,)`` in
    ``range(num_classes)``. Equality is identity: comparing arrays element-wise is the caller's
    business.
    """

    name: str
    x: np.ndarray = field(repr=False)
    y: np.ndarray = field(repr=False)
    classes: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        if self.x.ndim != 4:
            raise ValueError(f"x must be (N, C, H, W), got shape {self.x.shape}")
        if self.y.shape != (self.x.shape[0],):
            raise ValueError(f"y must be ({self.x.shape[0]},), got shape {self.y.shape}")
        if not len(self.mean) == len(self.std) == self.x.shape[1]:
            raise ValueError(
                f"mean/std need one value per channel ({self.x.shape[1]}), "
                f"got {len(self.mean)} and {len(self.std)}"
            )

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.x.shape[1])

    @property
    def image_size(self) -> int:
        return int(self.x.shape[2])

    def __len__(self) -> int:
        return int(self.y.shape[0])


_CIFAR_LAYOUT = (
    "<root>/cifar-10-batches-bin/{data_batch_1..5.bin, test_batch.bin, batches.meta.txt}"
)
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_MNIST_LAYOUT = "<root>[/MNIST/raw]/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
_IMAGEFOLDER_LAYOUT = "<root>/<class>/<image> or <root>/{train,test|val}/<class>/<image>"

DATASETS: Mapping[str, DatasetInfo] = MappingProxyType(
    {
        "cifar10": DatasetInfo(
            "CIFAR-10, binary version: 50,000 train / 10,000 test RGB 32x32, 10 classes",
            needs_root=True,
            layout=_CIFAR_LAYOUT,
        ),
        "digits": DatasetInfo(
            "scikit-learn's bundled 8x8 digits upsampled to 32x32: 1,347 train / 450 test, "
            "10 classes, no download",
            needs_root=False,
        ),
        "digits-hard": DatasetInfo(
            "32x32 RGB digits generated from the bundled ones (warps, colour, texture, clutter): "
            "10,000 train (digits-hard:<n> for n) / 2,000 test from disjoint source digits",
            needs_root=False,
        ),
        "imagefolder": DatasetInfo(
            "any folder of images, one subfolder per class (torchvision ImageFolder layout)",
            needs_root=True,
            layout=_IMAGEFOLDER_LAYOUT,
        ),
        "mnist": DatasetInfo(
            "MNIST IDX files: 60,000 train / 10,000 test gray 28x28, 10 classes",
            needs_root=True,
            layout=_MNIST_LAYOUT,
        ),
    }
)


def list_datasets() -> list[str]:
    """Names accepted by :func:`load_dataset`, sorted."""
    return sorted(DATASETS)


def load_dataset(
    name: str,
    split: str = "train",
    root: str | os.PathLike[str] | None = None,
    channels: int | None = None,
    image_size: int | None = None,
) -> ArrayDataset:
    """Read one split of a dataset as normalised numpy arrays.

    Args:
        name: one of :func:`list_datasets`.
        split: ``"train"`` or ``"test"``.
        root: folder holding the files; required by every reader but ``digits`` (see
            ``DATASETS[name].layout``).
        channels: ``None`` keeps the native channels; ``3`` replicates a gray channel, ``1``
            converts RGB to luminance (0.299 R + 0.587 G + 0.114 B).
        image_size: side of the square output. ``None`` keeps the reader's default (32 for
            digits, CIFAR-10 and imagefolder, 28 for MNIST). Digits accepts multiples of 8
            (exact pixel repetition); CIFAR-10 and MNIST resize by nearest neighbour;
            imagefolder resizes bilinearly with Pillow.

    Returns:
        The split, normalised with the train split's per-channel mean and std (on [0, 1]).

    Raises:
        DatasetError: unknown name or split, bad arguments, missing or malformed files.
    """
    key, _, options = str(name).strip().lower().partition(":")
    if key not in DATASETS:
        raise DatasetError(f"unknown dataset {name!r}; valid names: {', '.join(list_datasets())}")
    if split not in SPLITS:
        raise DatasetError(f"unknown split {split!r} for {key}; valid splits: train, test")
    if channels is not None and (isinstance(channels, bool) or channels not in (1, 3)):
        raise DatasetError(f"channels must be None, 1 or 3, got {channels!r}")
    if image_size is not None and (
        isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1
    ):
        raise DatasetError(f"image_size must be a positive integer or None, got {image_size!r}")

    info = DATASETS[key]
    root_path: Path | None = None
    if info.needs_root:
        if root is None:
            raise DatasetError(
                f"dataset {key!r} needs its files: pass root=<folder> (--data-root on the CLI); "
                f"expected layout: {info.layout}"
            )
        root_path = Path(root).expanduser()
        if not root_path.exists():
            raise DatasetError(f"root folder {root_path} does not exist; expected: {info.layout}")
        if not root_path.is_dir():
            raise DatasetError(f"root {root_path} is not a folder; expected: {info.layout}")

    loader = _reader(key, options.strip())
    train_x, train_y, classes = loader(root_path, "train", channels, image_size)
    mean, std = _channel_stats(train_x)
    if split == "train":
        x, y = train_x, train_y
    else:
        x, y, test_classes = loader(root_path, "test", channels, image_size)
        if test_classes != classes:
            raise DatasetError(
                f"{key}: test split has classes {list(test_classes)}, train has {list(classes)}"
            )
    return ArrayDataset(
        name=key,
        x=_normalise(x, mean, std),
        y=np.ascontiguousarray(y, dtype=np.int64),
        classes=classes,
        mean=tuple(float(v) for v in mean),
        std=tuple(float(v) for v in std),
    )


# --------------------------------------------------------------------------- shared helpers

_Loaded = tuple[np.ndarray, np.ndarray, tuple[str, ...]]
_Loader = Callable[[Path | None, str, int | None, int | None], _Loaded]


def _channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std in float64, in chunks so CIFAR-sized arrays need no big temps."""
    if x.shape[0] == 0:
        raise DatasetError("the train split is empty; cannot compute normalisation statistics")
    total = np.zeros(x.shape[1], dtype=np.float64)
    total_sq = np.zeros(x.shape[1], dtype=np.float64)
    for start in range(0, x.shape[0], chunk):
        part = x[start : start + chunk].astype(np.float64)
        total += part.sum(axis=(0, 2, 3))
        total_sq += np.square(part).sum(axis=(0, 2, 3))
    count = x.shape[0] * x.shape[2] * x.shape[3]
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean**2, 0.0))
    # A constant channel has no spread to divide by; leave its scale alone.
    std = np.where(std < 1e-8, 1.0, std)
    return mean, std


def _normalise(x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """``(x - mean) / std`` per channel, in place when ``x`` is a private writable array."""
    m = mean.astype(np.float32)[None, :, None, None]
    s = std.astype(np.float32)[None, :, None, None]
    if not x.flags.writeable or x.dtype != np.float32:
        return ((x - m) / s).astype(np.float32, copy=False)
    x -= m
    x /= s
    return x


def _convert_channels(x: np.ndarray, channels: int | None) -> np.ndarray:
    """Replicate a gray channel to 3, or reduce RGB to luminance, on float ``(N, C, H, W)``."""
    have = x.shape[1]
    if channels is None or channels == have:
        return x
    if have == 1 and channels == 3:
        return np.repeat(x, 3, axis=1)
    if have == 3 and channels == 1:
        return np.einsum("nchw,c->nhw", x, _LUMA)[:, None].astype(np.float32, copy=False)
    raise DatasetError(f"cannot convert {have} channels to {channels}")


def _resize_nearest(x: np.ndarray, size: int) -> np.ndarray:
    """Nearest-neighbour resize of ``(N, C, H, W)`` to ``size`` x ``size`` by index mapping."""
    height, width = x.shape[2], x.shape[3]
    if height == size and width == size:
        return x
    rows = (np.arange(size) * height) // size
    cols = (np.arange(size) * width) // size
    return x[:, :, rows[:, None], cols[None, :]]


def _uint8_to_float(pixels: np.ndarray, image_size: int | None, channels: int | None) -> np.ndarray:
    """Resize (on uint8, cheaper), scale to [0, 1] float32, convert channels."""
    if image_size is not None:
        pixels = _resize_nearest(pixels, image_size)
    x = pixels.astype(np.float32)
    x /= 255.0
    return _convert_channels(x, channels)


# --------------------------------------------------------------------------- digits


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Images on [0, 1] ``(1797, 1, 8, 8)``, labels, and the fixed train/test indices.

    Cached: scikit-learn parses a CSV each call, and the split must be computed once anyway.
    The arrays are read-only so that no caller can corrupt the cache.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = (np.asarray(bunch.images, dtype=np.float32) / 16.0)[:, None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = train_test_split(
        np.arange(len(labels)), test_size=0.25, random_state=0, stratify=labels
    )
    arrays = (images, labels, np.sort(train_idx), np.sort(test_idx))
    for array in arrays:
        array.flags.writeable = False
    return arrays


def _load_digits(
    root: Path | None, split: str, channels: int | None, image_size: int | None
) -> _Loaded:
    size = 32 if image_size is None else image_size
    if size % 8:
        raise DatasetError(
            f"digits image_size must be a multiple of 8 (exact pixel repetition), got {size}"
        )
    images, labels, train_idx, test_idx = _digits_raw()
    idx = train_idx if split == "train" else test_idx
    x = images[idx]
    factor = size // 8
    if factor > 1:
        x = np.repeat(np.repeat(x, factor, axis=2), factor, axis=3)
    return _convert_channels(x, channels), labels[idx], tuple(str(k) for k in range(10))


def _reader(key: str, options: str) -> _Loader:
    """The loader for ``key``; ``digits-hard`` alone takes options after a colon."""
    if key == "digits-hard":
        from .digits_hard import make_loader

        return make_loader(options)
    if options:
        raise DatasetError(f"dataset {key!r} takes no options after ':'; use plain {key!r}")
    return _LOADERS[key]


# --------------------------------------------------------------------------- CIFAR-10

_CIFAR_RECORD = 1 + 3 * 32 * 32
_CIFAR_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
_CIFAR_DOWNLOAD = (
    "download cifar-10-binary.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it there"
)


def _cifar_dir(root: Path) -> Path:
    """Find the folder of ``.bin`` batches: ``root`` itself or ``root/cifar-10-batches-bin``."""
    for folder in (root, root / "cifar-10-batches-bin"):
        if (folder / "data_batch_1.bin").is_file():
            return folder
    for folder in (root, root / "cifar-10-batches-py"):
        if (folder / "data_batch_1").is_file():
            raise DatasetError(
                f"{folder} holds the pickled (python) CIFAR-10, which is not read for safety "
                f"(unpickling can run code); {_CIFAR_DOWNLOAD}"
            )
    raise DatasetError(
        f"no CIFAR-10 binary batches (data_batch_1.bin) in {root}; expected {_CIFAR_LAYOUT}; "
        f"{_CIFAR_DOWNLOAD}"
    )


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    if not path.is_file():
        raise DatasetError(f"missing CIFAR-10 file {path}; expected {_CIFAR_LAYOUT}")
    raw = np.fromfile(path, dtype=np.uint8)
    if raw.size == 0 or raw.size % _CIFAR_RECORD:
        raise DatasetError(
            f"{path} is truncated or not a CIFAR-10 binary batch: {raw.size} bytes is not a "
            f"positive multiple of {_CIFAR_RECORD} (1 label byte + 3072 pixel bytes)"
        )
    records = raw.reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= len(_CIFAR_CLASSES):
        raise DatasetError(f"{path} has label {labels.max()}, CIFAR-10 labels are 0..9")
    return records[:, 1:].reshape(-1, 3, 32, 32), labels


def _cifar_classes(folder: Path) -> tuple[str, ...]:
    meta = folder / "batches.meta.txt"
    if not meta.is_file():
        return _CIFAR_CLASSES
    names = tuple(
        line.strip() for line in meta.read_text(encoding="utf-8").splitlines() if line.strip()
    )
    if len(names) != len(_CIFAR_CLASSES):
        raise DatasetError(
            f"{meta} lists {len(names)} class names, expected {len(_CIFAR_CLASSES)} (one a line)"
        )
    return names


def _load_cifar10(
    root: Path | None, split: str, channels: int | None, image_size: int | None
) -> _Loaded:
    assert root is not None
    folder = _cifar_dir(root)
    names = [f"data_batch_{i}.bin" for i in range(1, 6)] if split == "train" else ["test_batch.bin"]
    batches = [_read_cifar_batch(folder / file) for file in names]
    pixels = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    return _uint8_to_float(pixels, image_size, channels), labels, _cifar_classes(folder)


# --------------------------------------------------------------------------- MNIST

_IDX_UBYTE = 0x08


def _open_idx(folder: Path, name: str) -> bytes:
    """Bytes of ``name`` or ``name.gz`` in ``folder`` (plain preferred: no decompression)."""
    plain, packed = folder / name, folder / f"{name}.gz"
    if plain.is_file():
        return plain.read_bytes()
    if packed.is_file():
        try:
            with gzip.open(packed, "rb") as handle:
                return handle.read()
        except (OSError, EOFError) as exc:
            raise DatasetError(
                f"{packed} is not a valid gzip file ({exc}); download it again"
            ) from exc
    raise DatasetError(f"missing MNIST file {plain} (or {packed.name}); expected {_MNIST_LAYOUT}")


def _parse_idx(data: bytes, ndim: int, source: str) -> np.ndarray:
    """Decode an IDX unsigned-byte array of ``ndim`` dimensions, checking magic and size."""
    if len(data) < 4 + 4 * ndim:
        raise DatasetError(f"{source} is truncated: {len(data)} bytes, shorter than its header")
    magic = int.from_bytes(data[:4], "big")
    expected = (_IDX_UBYTE << 8) | ndim
    if magic != expected:
        raise DatasetError(
            f"{source} has IDX magic 0x{magic:08x}, expected 0x{expected:08x} "
            f"(unsigned bytes, {ndim} dims); not an MNIST {('label', '', 'image')[ndim - 1]} file"
        )
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    need = int(np.prod(shape, dtype=np.int64))
    have = len(data) - offset
    if have != need:
        kind = "truncated" if have < need else "longer than its header says"
        raise DatasetError(
            f"{source} is {kind}: header {shape} needs {need} data bytes, found {have}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=offset).reshape(shape)


def _mnist_dir(root: Path) -> Path:
    image_file = _MNIST_FILES["train"][0]
    for folder in (root, root / "MNIST" / "raw"):
        if any((folder / n).is_file() for n in (image_file, f"{image_file}.gz")):
            return folder
    raise DatasetError(
        f"no MNIST files ({image_file}[.gz]) in {root} or {root / 'MNIST' / 'raw'}; "
        f"expected {_MNIST_LAYOUT}"
    )


def _load_mnist(
    root: Path | None, split: str, channels: int | None, image_size: int | None
) -> _Loaded:
    assert root is not None
    folder = _mnist_dir(root)
    image_name, label_name = _MNIST_FILES[split]
    images = _parse_idx(_open_idx(folder, image_name), 3, str(folder / image_name))
    labels = _parse_idx(_open_idx(folder, label_name), 1, str(folder / label_name))
    if images.shape[0] != labels.shape[0]:
        raise DatasetError(
            f"MNIST {split}: {images.shape[0]} images but {labels.shape[0]} labels in {folder}"
        )
    if labels.size and labels.max() > 9:
        raise DatasetError(f"{folder / label_name} has label {labels.max()}, expected 0..9")
    x = _uint8_to_float(images[:, None], image_size, channels)
    return x, labels.astype(np.int64), tuple(str(k) for k in range(10))


# --------------------------------------------------------------------------- imagefolder

# The extensions torchvision's ImageFolder accepts.
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


def _class_folders(folder: Path) -> list[Path]:
    return sorted(
        (p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")),
        key=lambda p: p.name,
    )


def _scan_classes(folder: Path) -> tuple[tuple[str, ...], list[tuple[Path, int]]]:
    """Class names (sorted subfolders) and ``(file, label)`` pairs, files sorted by name."""
    classes = _class_folders(folder)
    if not classes:
        raise DatasetError(f"no class subfolders in {folder}; expected {_IMAGEFOLDER_LAYOUT}")
    samples: list[tuple[Path, int]] = []
    for label, class_dir in enumerate(classes):
        files = sorted(
            p for p in class_dir.iterdir() if p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS
        )
        if not files:
            raise DatasetError(
                f"class folder {class_dir} has no images ({', '.join(_IMAGE_EXTENSIONS)})"
            )
        samples.extend((p, label) for p in files)
    return tuple(p.name for p in classes), samples


def _stratified_split(labels: np.ndarray, test_fraction: float = 0.25, seed: int = 0) -> np.ndarray:
    """Boolean test mask: per class, a seeded draw of round(n * fraction) items (0 when n == 1).

    Done in numpy rather than with scikit-learn so that it also runs on a device without
    scikit-learn, and so that a class with a single image is no error.
    """
    rng = np.random.default_rng(seed)
    mask = np.zeros(labels.shape[0], dtype=bool)
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        n_test = int(members.size * test_fraction + 0.5) if members.size > 1 else 0
        mask[rng.permutation(members)[:n_test]] = True
    return mask


def _read_images(files: list[Path], channels: int | None, size: int) -> np.ndarray:
    Image = require("PIL.Image", "train", "the imagefolder reader")
    mode = "L" if channels == 1 else "RGB"
    out = np.empty((len(files), 1 if mode == "L" else 3, size, size), dtype=np.uint8)
    for i, path in enumerate(files):
        try:
            with Image.open(path) as image:
                converted = image.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        except (Image.UnidentifiedImageError, OSError) as exc:
            raise DatasetError(f"cannot read image {path}: {exc}") from exc
        pixels = np.asarray(converted, dtype=np.uint8)
        out[i] = pixels[None] if pixels.ndim == 2 else pixels.transpose(2, 0, 1)
    return out


def _load_imagefolder(
    root: Path | None, split: str, channels: int | None, image_size: int | None
) -> _Loaded:
    assert root is not None
    size = 32 if image_size is None else image_size
    test_dir = next((root / name for name in ("test", "val") if (root / name).is_dir()), None)
    if (root / "train").is_dir() and test_dir is not None:
        classes, samples = _scan_classes(root / "train")
        if split == "test":
            test_classes, test_samples = _scan_classes(test_dir)
            unknown = sorted(set(test_classes) - set(classes))
            if unknown:
                raise DatasetError(
                    f"{test_dir} has classes missing from {root / 'train'}: {', '.join(unknown)}"
                )
            index = {name: i for i, name in enumerate(classes)}
            samples = [(path, index[test_classes[label]]) for path, label in test_samples]
    else:
        classes, samples = _scan_classes(root)
        labels = np.asarray([label for _, label in samples], dtype=np.int64)
        test_mask = _stratified_split(labels)
        keep = test_mask if split == "test" else ~test_mask
        samples = [s for s, k in zip(samples, keep, strict=True) if k]
        if not samples:
            raise DatasetError(f"the {split} split of {root} is empty; add more images per class")
    pixels = _read_images([path for path, _ in samples], channels, size)
    x = _uint8_to_float(pixels, None, channels)
    y = np.asarray([label for _, label in samples], dtype=np.int64)
    return x, y, classes


_LOADERS: Mapping[str, _Loader] = MappingProxyType(
    {
        "cifar10": _load_cifar10,
        "digits": _load_digits,
        "imagefolder": _load_imagefolder,
        "mnist": _load_mnist,
    }
)
