"""Synthetic anomalies drawn on good images during training, so that a handful of real defects suffice.

GPU-safe (torch only). Four kinds, after the two methods that showed that a
classifier trained on good images plus made-up flaws learns to find real ones:

- ``cutpaste``: a rectangle of the image, colour-shifted, pasted elsewhere
  (CutPaste, Li et al., CVPR 2021);
- ``scar``: a thin rotated strip of the image pasted elsewhere (CutPaste-scar);
- ``blob``: an irregular region from thresholded smooth noise, filled with
  another image of the batch or a shifted tone of its own (DRAEM, Zavrtanik
  et al., ICCV 2021, where the fill is a foreign texture);
- ``stroke``: a thin random-walk line, dark or light.

They work on a float NCHW batch in [0, 1] on any device and draw every random
number from the generator they are given, so a seeded run repeats exactly.
The shapes, places and colours are drawn on the host, from a host generator
seeded once per batch by the given one: on CUDA, reading each of those numbers
back from the device would stall the GPU dozens of times per batch.
None of them is one of the defect types a dataset names: they stand for "any
local flaw", and the model still learns the real types from real examples.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

KINDS = ("cutpaste", "scar", "blob", "stroke")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, device=generator.device))


def _integer(generator: torch.Generator, low: int, high: int) -> int:
    """Uniform in [low, high)."""
    return int(torch.randint(low, high, (), generator=generator, device=generator.device))


def _colour_shift(patch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Brightness, contrast and per-channel gain changed a little, as CutPaste jitters its patch."""
    gain = 1.0 + (torch.rand((3, 1, 1), generator=generator, device=generator.device).to(patch.device) - 0.5) * 0.2
    brightness = _uniform(generator, -0.15, 0.15)
    contrast = _uniform(generator, 0.7, 1.3)
    mean = patch.mean()
    return (((patch - mean) * contrast + mean) * gain + brightness).clamp(0.0, 1.0)


def _cutpaste(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    _, h, w = image.shape
    area = _uniform(generator, 0.02, 0.12) * h * w
    aspect = math.exp(_uniform(generator, math.log(0.3), math.log(3.3)))
    ph = max(2, min(h - 1, round(math.sqrt(area * aspect))))
    pw = max(2, min(w - 1, round(math.sqrt(area / aspect))))
    sy, sx = _integer(generator, 0, h - ph + 1), _integer(generator, 0, w - pw + 1)
    ty, tx = _integer(generator, 0, h - ph + 1), _integer(generator, 0, w - pw + 1)
    patch = _colour_shift(image[:, sy:sy + ph, sx:sx + pw], generator)
    out = image.clone()
    out[:, ty:ty + ph, tx:tx + pw] = patch
    return out


def _rotation_grid(h: int, w: int, angle: float, centre: tuple[float, float], device: torch.device,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pixel coordinates of the image rotated by ``angle`` about ``centre``: (along, across), each (h, w)."""
    y = torch.arange(h, device=device, dtype=torch.float32).view(h, 1) - centre[0]
    x = torch.arange(w, device=device, dtype=torch.float32).view(1, w) - centre[1]
    along = x * math.cos(angle) + y * math.sin(angle)
    across = -x * math.sin(angle) + y * math.cos(angle)
    return along, across


def _scar(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    _, h, w = image.shape
    scale = min(h, w) / 256.0
    # At least two pixels wide and four long, or a small image's strip can fall between pixel centres and vanish.
    length = max(4.0, _uniform(generator, 10.0, 25.0) * 2 * scale)
    width = max(2.0, _uniform(generator, 2.0, 16.0) * scale)
    centre = (_uniform(generator, 0.15, 0.85) * h, _uniform(generator, 0.15, 0.85) * w)
    along, across = _rotation_grid(h, w, _uniform(generator, 0.0, math.pi), centre, image.device)
    # Soft edges: a hard one-pixel border would be a cue no real flaw has.
    mask = ((length / 2 - along.abs()).clamp(0, 1) * (width / 2 - across.abs()).clamp(0, 1)).unsqueeze(0)
    shift = (_integer(generator, h // 4, 3 * h // 4), _integer(generator, w // 4, 3 * w // 4))
    source = _colour_shift(torch.roll(image, shifts=shift, dims=(1, 2)), generator)
    return image * (1 - mask) + source * mask


def _smooth_noise(h: int, w: int, cells: int, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    grid = torch.randn((1, 1, cells, cells), generator=generator, device=generator.device).to(device)
    return F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False)[0, 0]


def _blob(image: torch.Tensor, generator: torch.Generator, batch: torch.Tensor) -> torch.Tensor:
    _, h, w = image.shape
    noise = _smooth_noise(h, w, _integer(generator, 3, 9), generator, image.device)
    # The region is the top few percent of the noise: one to a few irregular blobs.
    cut = torch.quantile(noise.flatten(), 1.0 - _uniform(generator, 0.02, 0.10))
    mask = ((noise - cut) / (noise.std() * 0.15 + 1e-6)).clamp(0, 1).unsqueeze(0)
    if _uniform(generator, 0.0, 1.0) < 0.5:
        other = batch[_integer(generator, 0, batch.shape[0])]
        fill = torch.rot90(other, _integer(generator, 0, 4), dims=(1, 2))
    else:
        fill = image * _uniform(generator, 0.3, 0.8) + _uniform(generator, -0.1, 0.1)
    opacity = _uniform(generator, 0.5, 1.0)
    return image * (1 - mask * opacity) + _colour_shift(fill, generator) * mask * opacity


def _stroke(image: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    _, h, w = image.shape
    scale = min(h, w)
    steps = _integer(generator, 3, 9)
    step = scale * _uniform(generator, 0.03, 0.08)
    heading = _uniform(generator, 0.0, 2 * math.pi)
    points = [torch.tensor([_uniform(generator, 0.2, 0.8) * h, _uniform(generator, 0.2, 0.8) * w])]
    for _ in range(steps):
        heading += _uniform(generator, -0.8, 0.8)
        points.append(points[-1] + step * torch.tensor([math.sin(heading), math.cos(heading)]))
    path = torch.stack(points).to(image.device)
    yy = torch.arange(h, device=image.device, dtype=torch.float32).view(h, 1, 1)
    xx = torch.arange(w, device=image.device, dtype=torch.float32).view(1, w, 1)
    start, end = path[:-1], path[1:]
    direction = end - start
    length2 = (direction ** 2).sum(1).clamp_min(1e-6)
    t = (((yy - start[:, 0]) * direction[:, 0] + (xx - start[:, 1]) * direction[:, 1]) / length2).clamp(0, 1)
    distance = torch.sqrt((yy - start[:, 0] - t * direction[:, 0]) ** 2
                          + (xx - start[:, 1] - t * direction[:, 1]) ** 2).amin(dim=2)
    width = max(1.0, scale * _uniform(generator, 0.004, 0.015))
    mask = (width / 2 + 0.5 - distance).clamp(0, 1).unsqueeze(0) * _uniform(generator, 0.6, 1.0)
    tone = _uniform(generator, 0.0, 0.15) if _uniform(generator, 0.0, 1.0) < 0.6 else _uniform(generator, 0.8, 1.0)
    return image * (1 - mask) + tone * mask


def draw(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A copy of the float NCHW batch ``images`` (values in [0, 1]) with one synthetic anomaly on each image.

    The kind is chosen uniformly per image. Blobs may take their fill from
    another image of the same batch, as DRAEM takes a foreign texture.
    """
    out = torch.empty_like(images)
    seed = int(torch.randint(0, 2 ** 62, (1,), generator=generator, device=generator.device).item())
    generator = torch.Generator().manual_seed(seed)
    for i in range(images.shape[0]):
        kind = KINDS[_integer(generator, 0, len(KINDS))]
        image = images[i]
        if kind == "cutpaste":
            out[i] = _cutpaste(image, generator)
        elif kind == "scar":
            out[i] = _scar(image, generator)
        elif kind == "blob":
            out[i] = _blob(image, generator, images)
        else:
            out[i] = _stroke(image, generator)
    return out.clamp_(0.0, 1.0)
