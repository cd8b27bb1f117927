"""Synthetic defect dataset: textured surfaces with scratches, holes, stains and cracks.

GPU-safe (numpy + Pillow only). Writes the MVTec-style layout that
``defectkit.data.parse_layout`` reads::

    <out>/{train,test}/<class>/<index>.jpg
    <out>/ground_truth/<defect>/<index>_mask.png      (binary, 0/255)

Every image is rendered from its own generator seeded with ``(seed, index)``,
so any subset of images can be rendered alone, in any order or in parallel,
and comes out byte-identical. File names are the global index, so stems are
unique across splits and a mask can never be attributed to the wrong image.
"""

from __future__ import annotations

import io
import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from defectkit.data import GOOD, MASK_DIR
from defectkit.cores import usable_cores

log = logging.getLogger(__name__)

DEFECT_TYPES = ("scratch", "hole", "stain", "crack")
SURFACES = ("brushed", "woven", "granular")
TRAIN_FRACTION = 0.7
JPEG_QUALITY = 92
MIN_SIZE = 32

# Strokes are drawn at this multiple of the image size and box-filtered down,
# which anti-aliases lines that are only a few pixels wide.
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class SampleSummary:
    root: Path
    counts: dict[str, dict[str, int]]  # split -> class -> images
    masks: int

    @property
    def images(self) -> int:
        return sum(n for per_class in self.counts.values() for n in per_class.values())


@dataclass(frozen=True)
class _Item:
    index: int
    split: str
    class_name: str

    def stem(self, digits: int) -> str:
        return f"{self.index:0{digits}d}"


def _plan(count: int) -> list[_Item]:
    """70/30 train/test; in each split half good, half defects spread evenly over the types."""
    n_train = round(count * TRAIN_FRACTION)
    items: list[_Item] = []
    for split, n in (("train", n_train), ("test", count - n_train)):
        n_defect = n // 2
        per_class = [n - n_defect] + [n_defect // len(DEFECT_TYPES) + (i < n_defect % len(DEFECT_TYPES))
                                      for i in range(len(DEFECT_TYPES))]
        for class_name, k in zip((GOOD, *DEFECT_TYPES), per_class, strict=True):
            for _ in range(k):
                items.append(_Item(len(items), split, class_name))
    return items


def _min_count() -> int:
    return next(n for n in range(1, 1000) if _covers_every_class(n))


def _covers_every_class(count: int) -> bool:
    present = {(item.split, item.class_name) for item in _plan(count)}
    return len(present) == 2 * (1 + len(DEFECT_TYPES))


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    y.flags.writeable = False
    x.flags.writeable = False
    return y, x


def _value_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Smooth noise with unit-ish variance: a cells x cells random grid upsampled bicubically."""
    grid = rng.standard_normal((cells, cells)).astype(np.float32)
    return np.asarray(Image.fromarray(grid).resize((size, size), Image.BICUBIC))


def _normalised(a: np.ndarray) -> np.ndarray:
    return (a - a.mean()) / (a.std() + 1e-6)


def _brushed(rng: np.random.Generator, size: int) -> np.ndarray:
    # Streaks are noise that is smooth along one axis and rough across it; the
    # canvas is larger than the image so that rotating it leaves no empty corners.
    big = int(size * 1.45) + 2
    along = max(2, big // int(rng.integers(12, 40)))
    fine = Image.fromarray(rng.standard_normal((big, along)).astype(np.float32)).resize((big, big), Image.BICUBIC)
    coarse_rows = max(2, big // int(rng.integers(3, 8)))
    coarse = Image.fromarray(rng.standard_normal((coarse_rows, along)).astype(np.float32)).resize(
        (big, big), Image.BICUBIC)
    streaks = 0.6 * _normalised(np.asarray(fine)) + 0.4 * _normalised(np.asarray(coarse))
    angle = float(rng.uniform(0.0, 180.0))
    rotated = np.asarray(Image.fromarray(streaks.astype(np.float32)).rotate(angle, Image.BILINEAR))
    lo = (big - size) // 2
    streaks = _normalised(rotated[lo:lo + size, lo:lo + size])
    sheen = _value_noise(rng, size, int(rng.integers(2, 4)))
    return 0.045 * streaks + 0.06 * sheen


def _woven(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    theta = rng.uniform(0.0, math.pi)
    period = size * rng.uniform(0.03, 0.06)
    # Threads wander a little, as real yarn does.
    wobble = period * 0.12
    u = (x * math.cos(theta) + y * math.sin(theta) + wobble * _value_noise(rng, size, 6)) / period
    v = (-x * math.sin(theta) + y * math.cos(theta) + wobble * _value_noise(rng, size, 6)) / period
    warp = np.clip(np.sin(np.pi * (u % 1.0)), 0.0, 1.0)
    weft = np.clip(np.sin(np.pi * (v % 1.0)), 0.0, 1.0)
    warp_on_top = (np.floor(u) + np.floor(v)) % 2 == 0
    cloth = np.sqrt(np.where(warp_on_top, warp * (0.7 + 0.3 * weft), weft * (0.7 + 0.3 * warp)))
    fuzz = rng.standard_normal((size, size), dtype=np.float32)
    return 0.11 * (cloth - cloth.mean()) + 0.012 * fuzz + 0.04 * _value_noise(rng, size, 3)


def _granular(rng: np.random.Generator, size: int) -> np.ndarray:
    octaves = (0.5 * _value_noise(rng, size, 4)
               + 0.35 * _value_noise(rng, size, 12)
               + 0.25 * _value_noise(rng, size, max(4, size // 6)))
    grain = rng.standard_normal((size, size), dtype=np.float32)
    draw = rng.random((size, size), dtype=np.float32)
    speckle = (draw > 0.9925).astype(np.float32) - (draw < 0.0075)
    return 0.045 * octaves + 0.025 * grain + 0.08 * speckle


_TEXTURES = {"brushed": _brushed, "woven": _woven, "granular": _granular}


def _surface(rng: np.random.Generator, size: int) -> np.ndarray:
    """A tinted RGB surface in [0, 1] with mid-range brightness, so defects can go either way."""
    kind = SURFACES[int(rng.integers(len(SURFACES)))]
    texture = _TEXTURES[kind](rng, size) * rng.uniform(0.75, 1.25)
    luminance = rng.uniform(0.38, 0.62) + texture
    hue = rng.uniform(0.0, 2 * math.pi)
    saturation = rng.uniform(0.0, 0.16)
    tint = 1.0 + saturation * np.cos(hue - np.array([0.0, 2.0944, 4.1888], np.float32))
    return luminance[..., None] * tint.astype(np.float32)


def _strokes(size: int, polylines: list[tuple[np.ndarray, float]]) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] of polylines given as ((n, 2) xy points, width in px)."""
    canvas = Image.new("L", (size * _SUPERSAMPLE, size * _SUPERSAMPLE), 0)
    draw = ImageDraw.Draw(canvas)
    for points, width in polylines:
        scaled = [(float(px), float(py)) for px, py in points * _SUPERSAMPLE]
        w = max(1, round(width * _SUPERSAMPLE))
        draw.line(scaled, fill=255, width=w, joint="curve")
        r = w / 2
        for px, py in (scaled[0], scaled[-1]):  # round caps
            draw.ellipse((px - r, py - r, px + r, py + r), fill=255)
    return np.asarray(canvas.resize((size, size), Image.BOX), dtype=np.float32) / 255.0


def _toward(img: np.ndarray, target: np.ndarray | float, alpha: np.ndarray) -> np.ndarray:
    a = alpha[..., None]
    return img * (1.0 - a) + np.asarray(target, np.float32) * a


def _scratch(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    length = size * rng.uniform(0.25, 0.5)
    centre = rng.uniform(0.3, 0.7, 2) * size
    theta = rng.uniform(0.0, math.pi)
    direction = np.array([math.cos(theta), math.sin(theta)])
    normal = np.array([-direction[1], direction[0]])
    p0, p2 = centre - direction * length / 2, centre + direction * length / 2
    p1 = centre + normal * length * rng.uniform(-0.15, 0.15)  # slight bow
    t = np.linspace(0.0, 1.0, 24)[:, None]
    points = (1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t ** 2 * p2
    # Real scratches fade in and out along their length.
    alpha = _strokes(size, [(points, size * rng.uniform(0.01, 0.018))])
    alpha *= np.clip(0.75 + 0.25 * _value_noise(rng, size, 5), 0.4, 1.0)
    target = rng.uniform(0.9, 1.0) if rng.random() < 0.5 else rng.uniform(0.02, 0.1)
    return _toward(img, target, alpha * rng.uniform(0.8, 0.95)), alpha > 0.3


def _hole(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    y, x = _grid(size)
    radius = size * rng.uniform(0.045, 0.09)
    cx, cy = rng.uniform(0.2, 0.8, 2) * size
    squash = rng.uniform(0.8, 1.0)
    tilt = rng.uniform(0.0, math.pi)
    dx, dy = x - cx, y - cy
    along = dx * math.cos(tilt) + dy * math.sin(tilt)
    across = (-dx * math.sin(tilt) + dy * math.cos(tilt)) / squash
    dist = np.sqrt(along ** 2 + across ** 2)
    inside = np.clip((radius - dist) / max(1.0, radius * 0.12), 0.0, 1.0)
    pit = rng.uniform(0.02, 0.08) + 0.18 * np.minimum(dist / radius, 1.0) ** 2  # darkest at the bottom
    out = _toward(img, pit[..., None], inside * rng.uniform(0.85, 0.97))
    # A raised rim, lit from one side.
    light = rng.uniform(0.0, 2 * math.pi)
    rim = np.exp(-(((dist - radius * 1.12) / (radius * 0.14)) ** 2))
    rim *= 0.55 + 0.45 * np.cos(np.arctan2(dy, dx) - light)
    out = _toward(out, rng.uniform(0.85, 0.95), rim * 0.6 * (1.0 - inside))
    return out, dist <= radius * 1.25


_STAIN_COLOURS = np.array([
    (1.0, 0.68, 0.42),  # rust
    (0.85, 0.66, 0.45),  # brown
    (1.05, 0.95, 0.45),  # yellowed
    (0.55, 0.8, 0.82),  # teal corrosion
    (0.7, 0.62, 0.78),  # oily purple
], np.float32)


def _stain(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]
    y, x = _grid(size)
    r0 = size * rng.uniform(0.08, 0.14)
    cx, cy = rng.uniform(0.25, 0.75, 2) * size
    dx, dy = x - cx, y - cy
    dist = np.sqrt(dx ** 2 + dy ** 2)
    phi = np.arctan2(dy, dx)
    harmonics = np.arange(2, 6)
    amplitudes = rng.uniform(0.0, 0.12, harmonics.size)
    phases = rng.uniform(0.0, 2 * math.pi, harmonics.size)
    boundary = r0 * (1.0 + np.tensordot(amplitudes, np.cos(harmonics[:, None, None] * phi + phases[:, None, None]), 1))
    softness = r0 * rng.uniform(0.4, 0.7)
    alpha = np.clip((boundary - dist) / softness + 0.5, 0.0, 1.0)
    alpha = alpha * alpha * (3 - 2 * alpha)
    mottle = 0.85 + 0.15 * np.clip(_value_noise(rng, size, 10), -1.0, 1.0)
    # Dried stains are darker at the edge (the tide line).
    tide = np.exp(-(((dist - boundary) / (softness * 0.5)) ** 2)) * 0.35
    colour = _STAIN_COLOURS[int(rng.integers(len(_STAIN_COLOURS)))] * rng.uniform(0.5, 0.68)
    strength = np.clip(alpha * mottle + tide * (alpha > 0.05), 0.0, 1.0)
    return _toward(img, img * colour, strength), alpha > 0.5


def _crack(rng: np.random.Generator, img: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    size = img.shape[0]

    def walk(start: np.ndarray, heading: float, steps: int, step: float) -> np.ndarray:
        # Slow drift of the heading plus a zigzag per step makes the line jagged, not wavy.
        turns = heading + 0.35 * np.cumsum(rng.uniform(-1.0, 1.0, steps)) + rng.uniform(-0.7, 0.7, steps)
        lengths = step * rng.uniform(0.6, 1.4, steps)
        moves = np.stack([np.cos(turns) * lengths, np.sin(turns) * lengths], axis=1)
        return np.clip(np.vstack([start, start + np.cumsum(moves, axis=0)]), 1.0, size - 2.0)

    step = size * rng.uniform(0.025, 0.04)
    heading = rng.uniform(0.0, 2 * math.pi)
    main = walk(rng.uniform(0.3, 0.7, 2) * size, heading, int(rng.integers(7, 12)), step)
    width = size * rng.uniform(0.007, 0.012)
    polylines = [(main, width)]
    for _ in range(int(rng.integers(1, 4))):
        fork = main[int(rng.integers(1, len(main) - 1))]
        side = rng.choice(np.array([-1.0, 1.0]))
        polylines.append((walk(fork, heading + side * rng.uniform(0.5, 1.1), int(rng.integers(3, 6)), step * 0.7),
                          width * 0.65))
    alpha = _strokes(size, polylines)
    return _toward(img, rng.uniform(0.02, 0.08), alpha * rng.uniform(0.85, 0.97)), alpha > 0.3


_DEFECTS = {"scratch": _scratch, "hole": _hole, "stain": _stain, "crack": _crack}


def draw_defect(defect_type: str, rng: np.random.Generator, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(``image`` with one defect of ``defect_type`` drawn on it, the defect's boolean mask).

    ``image`` is float32 (H, W, 3) in [0, 1] and square; any surface will do,
    a photograph as well as a rendered one.
    """
    if defect_type not in _DEFECTS:
        raise ValueError(f"defect type {defect_type!r} is not one of {', '.join(DEFECT_TYPES)}")
    return _DEFECTS[defect_type](rng, image)


def _lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    y, x = _grid(size)
    theta = rng.uniform(0.0, 2 * math.pi)
    ramp = ((x * math.cos(theta) + y * math.sin(theta)) / size - 0.5) * rng.uniform(0.0, 0.2)
    vignette = ((x / size - 0.5) ** 2 + (y / size - 0.5) ** 2) * rng.uniform(0.0, 0.3)
    return (1.0 + ramp - vignette)[..., None]


def _render(item: _Item, size: int, seed: int) -> tuple[bytes, bytes | None]:
    """JPEG bytes of one image and, for a defect, PNG bytes of its mask."""
    rng = np.random.default_rng([seed, item.index])
    img = _surface(rng, size)
    mask = None
    if item.class_name != GOOD:
        img, mask = draw_defect(item.class_name, rng, img)
    img = img * _lighting(rng, size) + 0.012 * rng.standard_normal(img.shape, dtype=np.float32)
    pixels = np.clip(np.rint(img * 255.0), 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="JPEG", quality=JPEG_QUALITY)
    if mask is None:
        return buffer.getvalue(), None
    mask_buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_buffer, format="PNG")
    return buffer.getvalue(), mask_buffer.getvalue()


def generate_sample(out_dir: Path, *, count: int = 400, size: int = 256, seed: int = 0) -> SampleSummary:
    """Write a deterministic synthetic defect dataset of ``count`` images of ``size`` px to ``out_dir``.

    The same arguments always give byte-identical files. ``out_dir`` must be
    empty or absent, so that files of an earlier, different sample cannot mix in.
    """
    out_dir = Path(out_dir)
    if count < _min_count():
        raise ValueError(f"count={count} is too small: at least {_min_count()} images are needed "
                         f"for every class to appear in both train and test")
    if size < MIN_SIZE:
        raise ValueError(f"size={size} is too small: defects need at least {MIN_SIZE} px")
    if seed < 0:
        raise ValueError(f"seed={seed} must be a non-negative integer")
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new directory or remove it first")
    started = time.perf_counter()
    items = _plan(count)
    digits = max(4, len(str(count - 1)))
    counts: dict[str, dict[str, int]] = {}
    masks = 0
    # Each image has its own seed, so rendering in parallel gives the same bytes; numpy and Pillow release the GIL.
    with ThreadPoolExecutor(usable_cores()) as pool:
        rendered = pool.map(lambda item: _render(item, size, seed), items)
        for item, (image_bytes, mask_bytes) in zip(items, rendered):
            stem = item.stem(digits)
            target = out_dir / item.split / item.class_name / f"{stem}.jpg"
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(image_bytes)
            if mask_bytes is not None:
                mask_path = out_dir / MASK_DIR / item.class_name / f"{stem}_mask.png"
                mask_path.parent.mkdir(parents=True, exist_ok=True)
                mask_path.write_bytes(mask_bytes)
                masks += 1
            per_class = counts.setdefault(item.split, {})
            per_class[item.class_name] = per_class.get(item.class_name, 0) + 1
    log.info("wrote %d images of %dx%d px and %d masks to %s in %.1f s (seed %d): %s",
             len(items), size, size, masks, out_dir, time.perf_counter() - started, seed, counts)
    return SampleSummary(out_dir, counts, masks)
