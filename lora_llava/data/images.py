"""Images as LLaVA-1.5 feeds them: decoded to RGB, EXIF orientation applied, padded to a square.

LLaVA-1.5 pads each image to a square with the CLIP mean colour, centred, and
only then resizes (`image_aspect_ratio: pad` in its training scripts). A
centre crop, CLIPImageProcessor's default, cuts off what lies at the edges of
tall and wide images, which for documents and medical scans is often the point.
The square is made here, before the processor runs, so the result does not
depend on which image processor class or flags a checkpoint ships.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError, first_line


def open_image(path: str | Path) -> Image.Image:
    """Decode an image file to RGB with its EXIF orientation applied (raises `DataError`)."""
    try:
        with Image.open(path) as im:
            return _decoded(im)
    except FileNotFoundError:
        raise DataError(f"{path}: image not found") from None
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise DataError(f"{path}: unreadable image ({first_line(e)})") from None


def load_image(ref: Any) -> Image.Image:
    """An RGB image from a path, a PIL image, or a datasets image dict (`{"bytes", "path"}`)."""
    if isinstance(ref, Image.Image):
        return to_rgb(ImageOps.exif_transpose(ref))
    if isinstance(ref, dict):
        if ref.get("bytes"):
            try:
                with Image.open(io.BytesIO(ref["bytes"])) as im:
                    return _decoded(im)
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
                raise DataError(f"{ref.get('path') or 'embedded image'}: unreadable image ({first_line(e)})") from None
        ref = ref.get("path")
        if not ref:
            raise DataError("an image entry with neither bytes nor path")
    return open_image(ref)


def _decoded(im: Image.Image) -> Image.Image:
    im.load()  # decode fully now: a truncated file fails here, not later in a worker
    return to_rgb(ImageOps.exif_transpose(im))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to RGB: transparency onto white, 16-bit and float scaled to 8 bits, CMYK / L / P converted."""
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        # White, as transformers' convert_rgb does; dropping alpha would show the (often black) hidden colour.
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", im.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if im.mode.startswith("I") or im.mode == "F":
        # 16-bit / float greyscale (medical scans): stretch the used range to 0-255; converting
        # to L would clip everything above 255 to white, and a 12-bit scan divided by 256 is near black.
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        scaled = (a - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(a)
        im = Image.fromarray(scaled.round().astype(np.uint8))
    return im if im.mode == "RGB" else im.convert("RGB")


def mean_colour(image_mean: list[float] | tuple[float, ...]) -> tuple[int, int, int]:
    """LLaVA-1.5's padding colour: the processor's mean as 0-255 integers, truncated as its code does."""
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


def crop_to_square(im: Image.Image) -> Image.Image:
    """The centred square of the shorter side (what resize + centre crop keeps)."""
    w, h = im.size
    side = min(w, h)
    left, top = (w - side) // 2, (h - side) // 2
    return im.crop((left, top, left + side, top + side))


def pixel_values(images: list[Image.Image], image_processor, aspect: str = "pad") -> torch.Tensor:
    """(n, 3, S, S) pixel values. `pad`: LLaVA-1.5 pad-to-square; `crop`: centre square."""
    if aspect == "pad":
        colour = mean_colour(image_processor.image_mean)
        squares = [pad_to_square(im, colour) for im in images]
    elif aspect == "crop":
        squares = [crop_to_square(im) for im in images]
    else:
        raise ValueError(f"image aspect {aspect!r}: pad or crop")
    # do_pad=False: the square is already made; a processor that pads would pad nothing more.
    return image_processor(images=squares, return_tensors="pt", do_pad=False)["pixel_values"]


def is_anyres(image_processor) -> bool:
    """A LLaVA-NeXT image processor (a best-fit grid of tiles plus a global view) rather than LLaVA-1.5's single view."""
    return getattr(image_processor, "image_grid_pinpoints", None) is not None


def image_inputs(images: list[Image.Image], image_processor, aspect: str = "pad") -> dict[str, torch.Tensor]:
    """The model's image inputs: `pixel_values`, and for AnyRes `image_sizes` (height, width) beside (n, tiles, 3, S, S).

    AnyRes resizes and pads each tile itself, as the reference code does; `aspect` applies to LLaVA-1.5 only.
    """
    if not is_anyres(image_processor):
        return {"pixel_values": pixel_values(images, image_processor, aspect)}
    out = image_processor(images=images, return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_sizes": torch.as_tensor(out["image_sizes"], dtype=torch.long)}


def stack_image_inputs(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The image inputs of several samples as one batch; AnyRes tiles padded to the most any image has (the model drops them)."""
    parts = [p for p in parts if p]
    if not parts:
        return {}
    pixels = [p["pixel_values"] for p in parts]
    if "image_sizes" not in parts[0]:
        return {"pixel_values": torch.cat(pixels)}
    most = max(x.shape[1] for x in pixels)
    padded = [torch.nn.functional.pad(x, (0, 0, 0, 0, 0, 0, 0, most - x.shape[1])) for x in pixels]
    return {"pixel_values": torch.cat(padded), "image_sizes": torch.cat([p["image_sizes"] for p in parts])}
