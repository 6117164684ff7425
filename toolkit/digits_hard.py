"""``digits-hard``: a harder bundled benchmark, generated from scikit-learn's 8x8 digits.

Why: on ``digits`` float ResNet-18 reaches 0.98 and Bi-Real-18 0.95 in 8 epochs, so the
difference between two binary architectures drowns in seed noise. ``digits-hard`` keeps the
same ten classes and the same no-download source, but draws every image through a random
pipeline that a network has to see through:

1. the source digit (cubic-spline upsampled to 32x32) is placed by a random affine warp
   (rotation, scale, shear, translation) composed with a smooth elastic displacement field;
2. up to :attr:`Difficulty.clutter_slots` *fragments of other digits* (another source digit,
   warped and cut by a random half-plane) are drawn behind it;
3. background and foreground get random colours, each flat, a linear gradient between two
   colours or a smooth noise texture, with a minimum luminance contrast between the digit's
   colour and the background's;
4. Gaussian pixel noise, then quantisation to uint8 RGB.

No leakage: the 1,797 source digits are split first (stratified 75/25, seeded by ``seed``),
and train images (digits *and* clutter fragments) are drawn only from train sources, test images
only from test sources. :func:`generate` returns, with every image, the indices of all the
source digits it was drawn from, so the split can be checked.

Determinism and sizes: images are generated in whole chunks of :data:`CHUNK` with one random
stream per ``(seed, split, chunk)``, and image ``i`` has label ``i % 10``; so a training set of
any size is class-balanced to within one image, and the first ``n`` images of a larger set *are*
the ``n``-image set. The test set is fixed (:data:`TEST_SIZE` images) whatever the training size.

Generation is vectorised (scipy.ndimage, which scikit-learn already brings) and the result is
cached as safetensors in the user's cache folder (``platformdirs.user_cache_dir("bitfleet")``),
keyed by generator version, seed, split, size and the difficulty knobs; a damaged cache file is
regenerated. docs/datasets.md gives the knobs and measured accuracies and timings.

Example::

    from toolkit.data import load_dataset

    train = load_dataset("digits-hard")                  # (10000, 3, 32, 32), normalised
    small = load_dataset("digits-hard:2000", "train")    # the first 2000 of the same images
    other = load_dataset("digits-hard:n=5000,seed=1")    # another draw (and another split)
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from bitfleet.errors import require
from bitfleet.fsutil import atomic_write_bytes

from .data import DatasetError, _digits_raw, _stratified_split, _uint8_to_float

__all__ = [
    "CHUNK",
    "DEFAULT_SEED",
    "DEFAULT_TRAIN_SIZE",
    "DIFFICULTY",
    "GENERATOR_VERSION",
    "TEST_SIZE",
    "Difficulty",
    "HardDigits",
    "cache_dir",
    "generate",
    "load",
    "make_loader",
    "parse_options",
    "source_split",
]

log = logging.getLogger(__name__)

#: Bump whenever the images a given seed and size produce change, so stale caches are ignored.
GENERATOR_VERSION = 1
DEFAULT_TRAIN_SIZE = 10_000
DEFAULT_SEED = 0
TEST_SIZE = 2_000
CHUNK = 250
SIZE = 32
CLASSES = tuple(str(k) for k in range(10))
_SPLIT_CODE = {"train": 1, "test": 2}
_MAX_TRAIN_SIZE = 200_000  # 2.5 GB once normalised to float32
_GLYPH_CENTRE = (SIZE - 1) / 2.0


@dataclass(frozen=True)
class Difficulty:
    """The knobs that make digits-hard hard; docs/datasets.md says how each was tuned.

    Lengths are in pixels of the 32x32 output; the source digit drawn at ``scale`` 1.0 is as
    tall as the canvas.
    """

    rotation_deg: float = 18.0  # rotation drawn from +-rotation_deg
    scale: tuple[float, float] = (0.7, 1.0)  # height of the digit relative to the canvas
    shear: float = 0.2  # horizontal shear factor drawn from +-shear
    translate: float = 3.0  # shift of the digit's centre drawn from +-translate per axis
    elastic_alpha: float = 0.8  # RMS displacement of the elastic field
    elastic_sigma: float = 3.0  # smoothness (Gaussian sigma) of the elastic field
    clutter_slots: int = 2  # fragments of other digits, at most
    clutter_prob: float = 0.45  # chance that each slot holds a fragment
    clutter_same_colour: float = 0.5  # chance that a fragment has the digit's colour
    min_contrast: float = 0.22  # minimum |luma(digit) - luma(background colour)|, both colours
    texture_prob: tuple[float, float, float] = (0.3, 0.3, 0.4)  # flat, gradient, noise
    foreground_jitter: float = 0.25  # second foreground colour within +-jitter of the first
    noise: float = 0.11  # per-image pixel noise sigma drawn from [0, noise]

    def digest(self) -> str:
        """Short hash of the knobs, part of the cache key."""
        text = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:12]


DIFFICULTY = Difficulty()


@dataclass(frozen=True, eq=False)
class HardDigits:
    """One generated split: uint8 RGB images, labels, and every source digit each image uses.

    ``sources[i, 0]`` is the index (into scikit-learn's 1,797 digits) of image ``i``'s digit,
    ``sources[i, 1:]`` those of its clutter fragments, -1 for an empty slot.
    """

    x: np.ndarray  # uint8 (N, 3, 32, 32)
    y: np.ndarray  # int64 (N,)
    sources: np.ndarray  # int64 (N, 1 + clutter_slots)


# --------------------------------------------------------------------------- generation


def source_split(seed: int = DEFAULT_SEED) -> dict[str, np.ndarray]:
    """Sorted indices of the train and test *source* digits: stratified 75/25, seeded."""
    _, labels, _, _ = _digits_raw()
    test_mask = _stratified_split(np.asarray(labels), test_fraction=0.25, seed=seed)
    return {"train": np.flatnonzero(~test_mask), "test": np.flatnonzero(test_mask)}


@functools.lru_cache(maxsize=1)
def _glyphs() -> np.ndarray:
    """All 1,797 source digits as float32 ``(1797, 32, 32)`` on [0, 1], cubic upsampled.

    Cached (read-only): the spline upsampling costs more than a chunk of images.
    """
    ndimage = require("scipy.ndimage", "train", "the digits-hard generator")
    images = np.asarray(_digits_raw()[0][:, 0], dtype=np.float64)
    big = ndimage.zoom(
        images, (1, SIZE / 8, SIZE / 8), order=3, mode="grid-constant", grid_mode=True
    )
    glyphs = np.clip(big, 0.0, 1.0).astype(np.float32)
    glyphs.flags.writeable = False
    return glyphs


def _smooth(rng: np.random.Generator, count: int, sigma: float) -> np.ndarray:
    """``count`` smooth random fields ``(count, 32, 32)``, each scaled to zero mean, unit RMS."""
    from scipy import ndimage

    field = ndimage.gaussian_filter(
        rng.standard_normal((count, SIZE, SIZE)), sigma=(0, sigma, sigma), mode="wrap"
    )
    field -= field.mean(axis=(1, 2), keepdims=True)
    field /= np.sqrt(np.mean(field**2, axis=(1, 2), keepdims=True)) + 1e-12
    return field


def _texture_field(rng: np.random.Generator, count: int, probs: tuple[float, ...]) -> np.ndarray:
    """Per image a blend field on [0, 1]: 0 (flat), a linear gradient, or a noise texture."""
    kind = rng.choice(3, size=count, p=np.asarray(probs) / np.sum(probs))
    grid = np.arange(SIZE) - _GLYPH_CENTRE
    angle = rng.uniform(0, 2 * np.pi, count)[:, None, None]
    ramp = np.cos(angle) * grid[None, None, :] + np.sin(angle) * grid[None, :, None]
    gradient = 0.5 + ramp / (2 * _GLYPH_CENTRE * np.sqrt(2))
    mix = rng.uniform(0, 1, count)[:, None, None]
    noise = mix * _smooth(rng, count, 1.0) + (1 - mix) * _smooth(rng, count, 4.0)
    low = noise.min(axis=(1, 2), keepdims=True)
    noise = (noise - low) / (noise.max(axis=(1, 2), keepdims=True) - low + 1e-12)
    field = np.where(kind[:, None, None] == 1, gradient, noise)
    return np.where(kind[:, None, None] == 0, 0.0, field)


def _luma(rgb: np.ndarray) -> np.ndarray:
    return rgb @ np.asarray([0.299, 0.587, 0.114])


def _colours(rng: np.random.Generator, count: int, knobs: Difficulty) -> tuple[np.ndarray, ...]:
    """Background colours ``(bg1, bg2)`` and foreground ``(fg1, fg2)``, each ``(count, 3)``.

    The digit's colour ``fg1`` differs in luma from both background colours by at least
    ``min_contrast`` (redrawn until it does); ``fg2`` is a jittered copy for its texture.
    """
    bg1, bg2, fg1 = (rng.uniform(0, 1, (count, 3)) for _ in range(3))
    for _ in range(1000):
        bad = (
            np.minimum(np.abs(_luma(fg1) - _luma(bg1)), np.abs(_luma(fg1) - _luma(bg2)))
            < knobs.min_contrast
        )
        if not bad.any():
            break
        n_bad = int(bad.sum())
        bg1[bad], bg2[bad], fg1[bad] = (rng.uniform(0, 1, (n_bad, 3)) for _ in range(3))
    jitter = knobs.foreground_jitter
    fg2 = np.clip(fg1 + rng.uniform(-jitter, jitter, (count, 3)), 0, 1)
    return bg1, bg2, fg1, fg2


def _inverse_affine(
    rng: np.random.Generator,
    count: int,
    rotation: float,
    scale: tuple[float, float],
    shear: float,
) -> np.ndarray:
    """``(count, 2, 2)`` inverses of ``rotation @ shear @ scale``, mapping output to glyph."""
    theta = np.deg2rad(rng.uniform(-rotation, rotation, count))
    zoom = rng.uniform(scale[0], scale[1], count)
    skew = rng.uniform(-shear, shear, count)
    cos, sin = np.cos(theta), np.sin(theta)
    # forward A = R(theta) @ [[1, skew], [0, 1]] @ diag(zoom, zoom), in (x, y) order
    a11, a12 = cos * zoom, (cos * skew - sin) * zoom
    a21, a22 = sin * zoom, (sin * skew + cos) * zoom
    det = a11 * a22 - a12 * a21
    inverse = np.stack([np.stack([a22, -a12], -1), np.stack([-a21, a11], -1)], -2)
    return inverse / det[:, None, None]


def _sample(glyphs: np.ndarray, index: np.ndarray, gx: np.ndarray, gy: np.ndarray) -> np.ndarray:
    """Bilinear samples of ``glyphs[index]`` at glyph coordinates ``(gx, gy)``; 0 outside."""
    from scipy import ndimage

    plane = np.broadcast_to(index[:, None, None].astype(np.float64), gx.shape)
    coords = np.stack([plane, gy, gx])
    return ndimage.map_coordinates(glyphs, coords, order=1, mode="constant", cval=0.0)


def _warp_coords(
    inverse: np.ndarray, shift: np.ndarray, u: np.ndarray, v: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Glyph coordinates of output points ``(u, v)`` (centred) under ``inverse``, ``shift``."""
    du = u - shift[:, 0, None, None]
    dv = v - shift[:, 1, None, None]
    gx = inverse[:, 0, 0, None, None] * du + inverse[:, 0, 1, None, None] * dv
    gy = inverse[:, 1, 0, None, None] * du + inverse[:, 1, 1, None, None] * dv
    return gx + _GLYPH_CENTRE, gy + _GLYPH_CENTRE


def _chunk(
    glyphs: np.ndarray,
    pool: np.ndarray,
    pool_labels: np.ndarray,
    labels: np.ndarray,
    rng: np.random.Generator,
    knobs: Difficulty,
) -> tuple[np.ndarray, np.ndarray]:
    """One chunk of images (uint8) and their source indices, for the given labels."""
    count = labels.shape[0]
    grid = np.arange(SIZE, dtype=np.float64) - _GLYPH_CENTRE
    u = np.broadcast_to(grid[None, None, :], (count, SIZE, SIZE))
    v = np.broadcast_to(grid[None, :, None], (count, SIZE, SIZE))

    # the digit: a source of the right class from this split's pool
    order = np.argsort(pool_labels, kind="stable")
    by_class, starts = pool[order], np.searchsorted(pool_labels[order], np.arange(10))
    counts = np.bincount(pool_labels, minlength=10)
    digit = by_class[starts[labels] + rng.integers(0, counts[labels])]
    elastic = knobs.elastic_alpha * _smooth(rng, 2 * count, knobs.elastic_sigma)
    inverse = _inverse_affine(rng, count, knobs.rotation_deg, knobs.scale, knobs.shear)
    shift = rng.uniform(-knobs.translate, knobs.translate, (count, 2))
    gx, gy = _warp_coords(inverse, shift, u + elastic[:count], v + elastic[count:])
    alpha = _sample(glyphs, digit, gx, gy)

    # clutter: fragments of other digits of the same split, cut by a random half-plane
    slots = knobs.clutter_slots
    sources = np.full((count, 1 + slots), -1, dtype=np.int64)
    sources[:, 0] = digit
    fragments = np.zeros((slots, count, SIZE, SIZE))
    if slots:
        n = slots * count
        active = rng.uniform(0, 1, n) < knobs.clutter_prob
        other = pool[rng.integers(0, pool.shape[0], n)]
        f_inverse = _inverse_affine(rng, n, 180.0, knobs.scale, knobs.shear)
        f_shift = rng.uniform(-_GLYPH_CENTRE, _GLYPH_CENTRE, (n, 2))
        fu, fv = np.tile(u, (slots, 1, 1)), np.tile(v, (slots, 1, 1))
        fx, fy = _warp_coords(f_inverse, f_shift, fu, fv)
        cut = rng.uniform(0, 2 * np.pi, n)[:, None, None]
        offset = rng.uniform(-4, 4, n)[:, None, None]
        side = np.cos(cut) * (fu - f_shift[:, 0, None, None]) + np.sin(cut) * (
            fv - f_shift[:, 1, None, None]
        )
        keep = np.clip(side - offset + 0.5, 0, 1) * active[:, None, None]
        strength = rng.uniform(0.6, 1.0, n)[:, None, None]
        fragments = (_sample(glyphs, other, fx, fy) * keep * strength).reshape(
            slots, count, SIZE, SIZE
        )
        sources[:, 1:] = np.where(active, other, -1).reshape(slots, count).T

    # colours and textures, then composition back to front: background, clutter, digit
    bg1, bg2, fg1, fg2 = _colours(rng, count, knobs)
    bg_field = _texture_field(rng, count, knobs.texture_prob)[:, None]
    fg_field = _texture_field(rng, count, knobs.texture_prob)[:, None]
    image = bg1[:, :, None, None] + (bg2 - bg1)[:, :, None, None] * bg_field
    for slot in range(slots):
        same = np.asarray(rng.uniform(0, 1, count) < knobs.clutter_same_colour)
        colour = np.where(same[:, None], fg1, rng.uniform(0, 1, (count, 3)))
        a = fragments[slot][:, None]
        image = image * (1 - a) + colour[:, :, None, None] * a
    foreground = fg1[:, :, None, None] + (fg2 - fg1)[:, :, None, None] * fg_field
    a = np.clip(alpha, 0, 1)[:, None]
    image = image * (1 - a) + foreground * a
    sigma = np.asarray(rng.uniform(0, knobs.noise, count))[:, None, None, None]
    image = image + sigma * rng.standard_normal(image.shape)
    pixels = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return pixels, sources


def generate(
    split: str,
    n: int,
    seed: int = DEFAULT_SEED,
    knobs: Difficulty = DIFFICULTY,
) -> HardDigits:
    """Generate ``n`` images of ``split`` (no cache): deterministic in ``(split, n, seed, knobs)``.

    Image ``i`` has label ``i % 10`` and comes from chunk ``i // CHUNK``, whose random stream
    depends only on ``(seed, split, chunk)``: the first ``m`` images of any larger set are the
    ``m``-image set.
    """
    if split not in _SPLIT_CODE:
        raise DatasetError(f"unknown split {split!r} for digits-hard; valid splits: train, test")
    if n < 1:
        raise DatasetError(f"digits-hard needs at least 1 image, got {n}")
    _, all_labels, _, _ = _digits_raw()
    pool = source_split(seed)[split]
    pool_labels = np.asarray(all_labels)[pool]
    glyphs = _glyphs()
    xs, sources = [], []
    labels = np.arange(CHUNK) % 10  # CHUNK is a multiple of 10: image i has label i % 10
    for chunk in range((n + CHUNK - 1) // CHUNK):
        # always a whole chunk, so that the draws, hence the images, do not depend on n
        rng = np.random.default_rng([seed, _SPLIT_CODE[split], chunk, GENERATOR_VERSION])
        x, s = _chunk(glyphs, pool, pool_labels, labels, rng, knobs)
        xs.append(x)
        sources.append(s)
    y = np.arange(n, dtype=np.int64) % 10
    return HardDigits(np.concatenate(xs)[:n], y, np.concatenate(sources)[:n])


# --------------------------------------------------------------------------- cache


def cache_dir() -> Path:
    """Where generated sets are kept: ``<user cache dir>/bitfleet/datasets``."""
    platformdirs = require("platformdirs", "train", "the digits-hard cache")
    return Path(platformdirs.user_cache_dir("bitfleet")) / "datasets"


def _cache_path(split: str, n: int, seed: int, knobs: Difficulty) -> Path:
    name = f"digits-hard-v{GENERATOR_VERSION}-{split}-seed{seed}-n{n}-{knobs.digest()}"
    return cache_dir() / f"{name}.safetensors"


def _cache_meta(split: str, n: int, seed: int, knobs: Difficulty) -> dict[str, str]:
    return {
        "generator": "digits-hard",
        "version": str(GENERATOR_VERSION),
        "split": split,
        "n": str(n),
        "seed": str(seed),
        "knobs": knobs.digest(),
    }


def _read_cache(path: Path, meta: dict[str, str], n: int, slots: int) -> HardDigits | None:
    """The cached set, or None when the file is missing, damaged or of another generation."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="numpy") as handle:
            if handle.metadata() != meta:
                return None
            data = HardDigits(
                handle.get_tensor("x"), handle.get_tensor("y"), handle.get_tensor("sources")
            )
    except (SafetensorError, OSError, ValueError, KeyError) as err:
        log.warning("digits-hard cache %s is unreadable (%s); regenerating it", path, err)
        return None
    shapes = (data.x.shape, data.y.shape, data.sources.shape)
    if shapes != ((n, 3, SIZE, SIZE), (n,), (n, 1 + slots)) or data.x.dtype != np.uint8:
        log.warning("digits-hard cache %s holds arrays of the wrong shape; regenerating it", path)
        return None
    return data


def load(
    split: str,
    n: int | None = None,
    seed: int = DEFAULT_SEED,
    knobs: Difficulty = DIFFICULTY,
) -> HardDigits:
    """One split from the cache, generated and cached first if needed.

    ``n`` is the number of training images (default :data:`DEFAULT_TRAIN_SIZE`); the test split
    always has :data:`TEST_SIZE`, whatever ``n`` is. A cache that cannot be written (read-only
    home, full disk) costs a warning, not the data.
    """
    from safetensors.numpy import save

    count = TEST_SIZE if split == "test" else (DEFAULT_TRAIN_SIZE if n is None else n)
    path = _cache_path(split, count, seed, knobs)
    meta = _cache_meta(split, count, seed, knobs)
    cached = _read_cache(path, meta, count, knobs.clutter_slots)
    if cached is not None:
        return cached
    data = generate(split, count, seed, knobs)
    tensors = {"x": data.x, "y": data.y, "sources": data.sources}
    try:
        atomic_write_bytes(path, save(tensors, metadata=meta))
    except OSError as err:
        log.warning(
            "could not cache digits-hard in %s (%s); it is regenerated next time", path, err
        )
    return data


# --------------------------------------------------------------------------- the data.py door


def parse_options(options: str) -> dict[str, int]:
    """``"20000"``, ``"n=20000"``, ``"n=5000,seed=1"`` or ``""`` -> ``{"n": ..., "seed": ...}``."""
    parsed = {"n": DEFAULT_TRAIN_SIZE, "seed": DEFAULT_SEED}
    usage = "use digits-hard, digits-hard:<n>, or digits-hard:n=<n>,seed=<s>"
    for index, item in enumerate(part.strip() for part in options.split(",") if part.strip()):
        key, eq, value = item.partition("=")
        if not eq and index == 0:
            key, value = "n", item
        if key.strip() not in parsed:
            raise DatasetError(f"digits-hard: unknown option {item!r}; {usage}")
        try:
            number = int(value.strip())
        except ValueError:
            raise DatasetError(
                f"digits-hard: {key.strip()} must be an integer, got {value.strip()!r}; {usage}"
            ) from None
        parsed[key.strip()] = number
    if not 1 <= parsed["n"] <= _MAX_TRAIN_SIZE:
        raise DatasetError(
            f"digits-hard: n must be between 1 and {_MAX_TRAIN_SIZE}, got {parsed['n']}"
        )
    if parsed["seed"] < 0:
        raise DatasetError(f"digits-hard: seed must be >= 0, got {parsed['seed']}")
    return parsed


_Loaded = tuple[np.ndarray, np.ndarray, tuple[str, ...]]


def make_loader(options: str) -> Callable[[Path | None, str, int | None, int | None], _Loaded]:
    """The reader :func:`toolkit.data.load_dataset` calls for ``digits-hard[:options]``."""
    parsed = parse_options(options)

    def loader(
        root: Path | None, split: str, channels: int | None, image_size: int | None
    ) -> _Loaded:
        data = load(split, n=parsed["n"], seed=parsed["seed"])
        return _uint8_to_float(data.x, image_size, channels), data.y, CLASSES

    return loader
