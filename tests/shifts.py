"""Production shifts the drift tests apply to images: a new light, a soft focus, a new surface material."""

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter


def brighter(picture: Image.Image, factor: float = 1.2) -> Image.Image:
    return ImageEnhance.Brightness(picture).enhance(factor)


def blurred(picture: Image.Image, radius: float = 1.0) -> Image.Image:
    return picture.filter(ImageFilter.GaussianBlur(radius))


def new_texture(picture: Image.Image, cell: int = 2) -> Image.Image:
    """A checkerboard weave of ``cell``-pixel squares over the surface: a material the reference never showed."""
    pixels = np.asarray(picture).astype(np.int16)
    y, x = np.mgrid[0:pixels.shape[0], 0:pixels.shape[1]]
    weave = ((x // cell + y // cell) % 2) * 60 - 30
    return Image.fromarray(np.clip(pixels + weave[..., None], 0, 255).astype(np.uint8))
