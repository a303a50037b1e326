"""Image loading as LLaVA-1.5 does it: any mode to RGB, EXIF orientation, pad to square.

LLaVA-1.5 pads each image to a square with the CLIP mean colour, centred, and
only then resizes (`image_aspect_ratio: pad` in its training scripts). A
centre crop, CLIPImageProcessor's default, cuts off what lies at the edges of
tall and wide images, which for documents and medical scans is often the point.
"""

from __future__ import annotations

from pathlib import Path

import torch
from PIL import Image, ImageOps

from ..errors import DataError


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied."""
    try:
        with Image.open(path) as im:
            im.load()
            im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({e})") from None


def to_rgb(im: Image.Image) -> Image.Image:
    """RGBA / LA / palette-with-transparency go onto white (not black); CMYK, L, I;16 convert."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA"):
        background = Image.new("RGB", im.size, (255, 255, 255))
        background.paste(im, mask=im.getchannel("A"))
        return background
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16-bit greyscale (common for medical scans): scale to 8 bits, not clip.
        im = im.point(lambda v: v / 256).convert("L")
    return im.convert("RGB") if im.mode != "RGB" else im


def mean_colour(image_mean: list[float] | tuple[float, ...]) -> tuple[int, int, int]:
    """The padding colour LLaVA-1.5 uses: the processor's mean, as 0-255 integers."""
    return tuple(int(x * 255) for x in image_mean)  # type: ignore[return-value]


def pad_to_square(im: Image.Image, colour: tuple[int, int, int]) -> Image.Image:
    """Pad the shorter side so the image sits centred on a square of `colour`."""
    w, h = im.size
    if w == h:
        return im
    side = max(w, h)
    square = Image.new(im.mode, (side, side), colour)
    square.paste(im, ((side - w) // 2, (side - h) // 2))
    return square


def pixel_values(images: list[Image.Image], image_processor, aspect: str = "pad") -> torch.Tensor:
    """(n, 3, S, S) pixel values. `pad`: LLaVA-1.5 pad-to-square; `crop`: resize + centre crop."""
    if aspect == "pad":
        colour = mean_colour(image_processor.image_mean)
        images = [pad_to_square(im, colour) for im in images]
    # We pad ourselves (above) so the choice does not depend on which processor class a checkpoint names.
    return image_processor(images=images, return_tensors="pt", do_pad=False)["pixel_values"]
