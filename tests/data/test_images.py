"""Images: LLaVA-1.5's pad-to-square with the CLIP mean colour, crop as an option, every PIL mode, EXIF."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from lora_llava.data.images import load_image, mean_colour, open_image, pixel_values
from lora_llava.errors import DataError
from lora_llava.model.processor import CLIP_MEAN, CLIP_STD

RED = (200, 30, 30)


def normalised(rgb) -> torch.Tensor:
    return (torch.tensor(rgb, dtype=torch.float32) / 255 - torch.tensor(CLIP_MEAN)) / torch.tensor(CLIP_STD)


def test_padding_colour_is_llavas_truncated_clip_mean():
    assert mean_colour(CLIP_MEAN) == (122, 116, 104)


@pytest.mark.parametrize("size", [(20, 60), (60, 20)], ids=["tall", "wide"])
def test_pad_to_square_border_is_the_normalised_mean_colour(tiny_processor, size):
    px = pixel_values([Image.new("RGB", size, RED)], tiny_processor.image_processor, "pad")[0]  # (3, 56, 56)
    assert px.shape == (3, 56, 56)
    border = px[:, :, :15] if size[0] < size[1] else px[:, :15, :]  # left band of a tall image, top band of a wide one
    far = px[:, :, -15:] if size[0] < size[1] else px[:, -15:, :]
    mean = normalised((122, 116, 104)).view(3, 1, 1)
    assert torch.allclose(border, mean.expand_as(border), atol=1e-4)
    assert torch.allclose(far, mean.expand_as(far), atol=1e-4)
    centre = px[:, 22:34, 22:34]
    assert torch.allclose(centre, normalised(RED).view(3, 1, 1).expand_as(centre), atol=1e-4)


def test_crop_keeps_only_the_centre(tiny_processor):
    im = Image.new("RGB", (90, 30), (0, 0, 255))
    im.paste(Image.new("RGB", (30, 30), (0, 255, 0)), (30, 0))
    px = pixel_values([im], tiny_processor.image_processor, "crop")[0]
    assert px.shape == (3, 56, 56)
    assert torch.allclose(px, normalised((0, 255, 0)).view(3, 1, 1).expand_as(px), atol=1e-4)
    padded = pixel_values([im], tiny_processor.image_processor, "pad")[0]
    assert torch.allclose(padded[:, 28, 2], normalised((0, 0, 255)), atol=1e-3)  # pad keeps the blue edges


def _rgb(im: Image.Image) -> tuple:
    return load_image(im).getpixel((0, 0))


def test_every_mode_becomes_rgb():
    rgba = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # transparent black -> white, not black
    assert _rgb(rgba) == (255, 255, 255)
    assert _rgb(Image.new("RGBA", (4, 4), (*RED, 255))) == RED
    assert _rgb(Image.new("LA", (4, 4), (0, 0))) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([10, 20, 30] * 256)
    assert _rgb(palette) == (10, 20, 30)
    palette.info["transparency"] = 0
    assert _rgb(palette) == (255, 255, 255)
    assert _rgb(Image.new("L", (4, 4), 100)) == (100, 100, 100)
    assert _rgb(Image.new("CMYK", (4, 4), (0, 255, 255, 0))) == (255, 0, 0)
    assert _rgb(Image.new("1", (4, 4), 1)) == (255, 255, 255)


def test_16_bit_scans_are_stretched_not_clipped(tmp_path):
    """A 12-bit scan in a 16-bit PNG: converting to L would clip it to white; its range maps to 0-255."""
    ramp = np.tile(np.linspace(0, 4095, 65), (8, 1)).astype(np.uint16)
    path = tmp_path / "scan.png"
    Image.fromarray(ramp).save(path)
    im = open_image(path)
    assert im.mode == "RGB"
    a = np.asarray(im)[..., 0]
    assert a.min() == 0 and a.max() == 255
    assert np.all(np.diff(a[0].astype(int)) >= 0)  # the ramp stays a ramp
    assert abs(int(a[0, 32]) - 128) <= 3


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (40, 20), RED)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    im.save(tmp_path / "photo.jpg", exif=exif)
    assert Image.open(tmp_path / "photo.jpg").size == (40, 20)
    assert open_image(tmp_path / "photo.jpg").size == (20, 40)


def test_corrupt_truncated_and_missing_images_are_data_errors(tmp_path):
    (tmp_path / "noise.jpg").write_bytes(b"not an image at all")
    buf = io.BytesIO()
    Image.effect_noise((64, 64), 50).convert("RGB").save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    for name, message in (("noise.jpg", "unreadable image"), ("cut.jpg", "unreadable image"), ("gone.jpg", "image not found")):
        with pytest.raises(DataError, match=message):
            open_image(tmp_path / name)
    with pytest.raises(DataError, match="unreadable image"):
        load_image({"bytes": b"garbage", "path": "x.png"})


def test_images_stored_in_a_dataset_load_from_bytes_or_path(tmp_path):
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), RED).save(buf, "PNG")
    Image.new("RGB", (8, 8), (0, 0, 255)).save(tmp_path / "b.png")
    assert load_image({"bytes": buf.getvalue(), "path": None}).getpixel((0, 0)) == RED
    assert load_image({"bytes": None, "path": str(tmp_path / "b.png")}).getpixel((0, 0)) == (0, 0, 255)
