"""A defect benchmark on real photographs: crops of three surface photographs with drawn defects.

The synthetic sample (``defectkit.synthetic``) renders its surfaces and is far
easier than real ones. This dataset starts from three texture photographs that
scikit-image ships in its wheel (``skimage/data/{brick,grass,gravel}.png``,
512x512 grey), so it can be built offline. Each image is a crop of one
photograph at a random position, scale and orientation, tinted as its surface
is in colour, lit unevenly, with sensor noise and JPEG compression; defect
images get one scratch, hole, stain or crack drawn on by
``defectkit.synthetic.draw_defect``. The layout is MVTec AD's, masks included.

Every image comes from its own generator seeded with ``(seed, index)``: the
same arguments give byte-identical files, and other seeds give other crops and
defects of the same kind, so that results can be checked across seeds.

    python -m tests.photos OUT [--train 440 --test 210 --size 256 --seed 0]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.resources
import io
import math
import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image

from defectkit.data import GOOD, MASK_DIR
from defectkit.synthetic import DEFECT_TYPES, draw_defect

# File, sha256 (so that another scikit-image release cannot change the benchmark unnoticed), and the colour the
# grey photograph is tinted to.
PHOTOGRAPHS = {
    "brick": ("brick.png", "7966caf324f6ba843118d98f7a07746d22f6a343430add0233eca5f6eaaa8fcf", (1.0, 0.78, 0.66)),
    "grass": ("grass.png", "b6b6022426b38936c43a4ac09635cd78af074e90f42ffa8227ac8b7452d39f89", (0.78, 0.95, 0.62)),
    "gravel": ("gravel.png", "c48615b451bf1e606fbd72c0aa9f8cc0f068ab7111ef7d93bb9b0f2586440c12", (0.95, 0.92, 0.86)),
}
CROP_SCALE = (0.35, 0.6)  # of the photograph's side
JPEG_QUALITY = 90


@dataclass(frozen=True)
class Item:
    index: int
    split: str
    class_name: str
    surface: str


def plan(train: int, test: int) -> list[Item]:
    """Half of each split good, half defects spread evenly over the types; surfaces in turn within each class."""
    items: list[Item] = []
    surfaces = tuple(PHOTOGRAPHS)
    for split, n in (("train", train), ("test", test)):
        n_defect = n // 2
        per_class = [n - n_defect] + [n_defect // len(DEFECT_TYPES) + (i < n_defect % len(DEFECT_TYPES))
                                      for i in range(len(DEFECT_TYPES))]
        for class_name, k in zip((GOOD, *DEFECT_TYPES), per_class, strict=True):
            for j in range(k):
                items.append(Item(len(items), split, class_name, surfaces[j % len(surfaces)]))
    return items


@lru_cache(maxsize=None)
def photograph(surface: str) -> np.ndarray:
    """The grey photograph of ``surface`` as float32 (512, 512) in [0, 1], checked against its sha256."""
    name, expected, _ = PHOTOGRAPHS[surface]
    # A GPU machine without scikit-image gets copies of the files in a folder named by PHOTOGRAPHS_DIR.
    folder = os.environ.get("PHOTOGRAPHS_DIR")
    data = (Path(folder) / name if folder else importlib.resources.files("skimage") / "data" / name).read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != expected:
        raise RuntimeError(f"skimage/data/{name} has sha256 {digest}, not {expected}: another scikit-image "
                           f"release changed the photograph, so results would not compare with earlier ones")
    return np.asarray(Image.open(io.BytesIO(data)).convert("L"), dtype=np.float32) / 255.0


def crop(rng: np.random.Generator, surface: str, size: int) -> np.ndarray:
    """A tinted RGB crop of the photograph at a random scale, position and orientation, as float32 in [0, 1]."""
    photo = photograph(surface)
    side = photo.shape[0]
    width = int(side * rng.uniform(*CROP_SCALE))
    x, y = (int(v) for v in rng.integers(0, side - width + 1, 2))
    grey = Image.fromarray(photo[y:y + width, x:x + width]).resize((size, size), Image.BICUBIC)
    grey = np.rot90(np.asarray(grey), int(rng.integers(4)))
    if rng.random() < 0.5:
        grey = grey[:, ::-1]
    tint = np.asarray(PHOTOGRAPHS[surface][2], np.float32) * rng.uniform(0.94, 1.06, 3).astype(np.float32)
    exposure = rng.uniform(0.85, 1.1)
    return np.clip(grey[..., None] * tint * exposure, 0.0, 1.0).astype(np.float32)


def lighting(rng: np.random.Generator, size: int) -> np.ndarray:
    """A gentle gradient across the image, as an uneven light over a part gives."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / size
    theta = rng.uniform(0.0, 2 * math.pi)
    ramp = (x * math.cos(theta) + y * math.sin(theta) - 0.5) * rng.uniform(0.0, 0.25)
    return (1.0 + ramp)[..., None]


def render(item: Item, size: int, seed: int) -> tuple[bytes, bytes | None]:
    """JPEG bytes of one image and, for a defect, PNG bytes of its mask."""
    rng = np.random.default_rng([seed, item.index])
    image = crop(rng, item.surface, size)
    mask = None
    if item.class_name != GOOD:
        image, mask = draw_defect(item.class_name, rng, image)
    image = image * lighting(rng, size) + 0.01 * rng.standard_normal(image.shape, dtype=np.float32)
    buffer = io.BytesIO()
    Image.fromarray(np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)).save(buffer, format="JPEG",
                                                                                     quality=JPEG_QUALITY)
    if mask is None:
        return buffer.getvalue(), None
    mask_buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(mask_buffer, format="PNG")
    return buffer.getvalue(), mask_buffer.getvalue()


def build(out_dir: Path, *, train: int = 440, test: int = 210, size: int = 256, seed: int = 0) -> dict:
    """Write the dataset to an empty ``out_dir``; returns the count of images per split and class."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; choose a new directory or remove it first")
    if min(train, test) < 2 * (1 + len(DEFECT_TYPES)):
        raise ValueError(f"train={train} and test={test} must each be at least {2 * (1 + len(DEFECT_TYPES))}, "
                         f"so that every class appears on every surface")
    counts: dict[str, dict[str, int]] = {}
    for item in plan(train, test):
        image, mask = render(item, size, seed)
        stem = f"{item.surface}_{item.index:04d}"
        target = out_dir / item.split / item.class_name / f"{stem}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(image)
        if mask is not None:
            mask_path = out_dir / MASK_DIR / item.class_name / f"{stem}_mask.png"
            mask_path.parent.mkdir(parents=True, exist_ok=True)
            mask_path.write_bytes(mask)
        per_class = counts.setdefault(item.split, {})
        per_class[item.class_name] = per_class.get(item.class_name, 0) + 1
    return counts


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.photos", description=__doc__.split("\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=440)
    parser.add_argument("--test", type=int, default=210)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(build(args.out, train=args.train, test=args.test, size=args.size, seed=args.seed))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
