"""Generated domain data for the demo and the tests: coloured shapes, with VQA and captions.

A small domain with a visible answer: one shape of one colour on a light
background, in images of varied (non-square) sizes. Questions come in the
forms medical VQA sets use: closed (yes/no) and open (one word).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 40), "blue": (30, 60, 220), "yellow": (235, 210, 20)}
SHAPES = ("circle", "square", "triangle")


def draw_shape(shape: str, colour: str, size: tuple[int, int], rng: random.Random) -> Image.Image:
    w, h = size
    im = Image.new("RGB", size, (245, 245, 240))
    d = ImageDraw.Draw(im)
    s = int(min(w, h) * rng.uniform(0.45, 0.7))
    x0, y0 = rng.randint(0, w - s), rng.randint(0, h - s)
    fill = COLOURS[colour]
    if shape == "circle":
        d.ellipse([x0, y0, x0 + s, y0 + s], fill=fill)
    elif shape == "square":
        d.rectangle([x0, y0, x0 + s, y0 + s], fill=fill)
    else:
        d.polygon([(x0 + s / 2, y0), (x0, y0 + s), (x0 + s, y0 + s)], fill=fill)
    return im


def _qa(shape: str, colour: str, rng: random.Random) -> list[tuple[str, str, str]]:
    """(question, answer, question type) triples about one image."""
    probe = rng.choice(SHAPES)
    return [
        ("What colour is the shape?", colour, "open"),
        (f"Is there a {probe}?", "yes" if probe == shape else "no", "closed"),
        ("What shape is shown?", shape, "open"),
    ]


def make_shapes_dataset(
    folder: str | Path,
    n_images: int = 64,
    seed: int = 0,
    split: str = "train",
    multi_turn: bool = False,
    image_size: tuple[int, int] = (64, 48),
) -> Path:
    """Write `images/` and `{split}.json` (LLaVA format) under `folder`; returns the JSON path.

    Each image yields one sample per question (or one multi-turn sample).
    Samples carry `question_type` (closed / open) and `answer` for evaluation.
    """
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for i in range(n_images):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        w, h = image_size
        size = (w, h) if rng.random() < 0.5 else (h, w)
        name = f"{split}_{i:05d}.png"
        draw_shape(shape, colour, size, rng).save(root / "images" / name)
        qas = _qa(shape, colour, rng)
        if multi_turn:
            conv = []
            for k, (q, a, _) in enumerate(qas):
                conv += [{"from": "human", "value": f"<image>\n{q}" if k == 0 else q}, {"from": "gpt", "value": a}]
            samples.append({"id": f"{split}-{i}", "image": name, "conversations": conv})
            continue
        for k, (q, a, qtype) in enumerate(qas):
            samples.append(
                {
                    "id": f"{split}-{i}-{k}",
                    "image": name,
                    "conversations": [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}],
                    "question_type": qtype,
                    "answer": a,
                }
            )
    path = root / f"{split}.json"
    path.write_text(json.dumps(samples, indent=1), encoding="utf-8")
    return path


def make_caption_dataset(folder: str | Path, n_images: int = 64, seed: int = 0) -> Path:
    """Stage-1 style captions (LLaVA pretraining JSON: `<image>` then the caption)."""
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for i in range(n_images):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        name = f"cap_{i:05d}.png"
        draw_shape(shape, colour, (56, 56), rng).save(root / "images" / name)
        samples.append(
            {
                "id": f"cap-{i}",
                "image": name,
                "conversations": [
                    {"from": "human", "value": "Render a clear and concise summary of the photo.\n<image>"},
                    {"from": "gpt", "value": f"a {colour} {shape}"},
                ],
            }
        )
    path = root / "captions.json"
    path.write_text(json.dumps(samples, indent=1), encoding="utf-8")
    return path


def make_demo_dataset(
    folder: str | Path,
    n_images: int = 300,
    seed: int = 0,
    split: str = "train",
    probe: str = "red",
    image_size: tuple[int, int] = (64, 48),
) -> Path:
    """The demo's VQA set: every image's colour (open), and a POPE-style existence question (closed).

    Colours are equally likely. The existence question always asks for a `probe`-coloured
    shape; it is asked about every probe-coloured image and about a matching share of the
    others, so "yes" and "no" are equally likely (chance: 50%), as in POPE's balanced sets.
    Samples carry `question_type` and `answer` like `make_shapes_dataset`'s.
    """
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    ask_absent = 1 / (len(COLOURS) - 1)
    samples = []
    for i in range(n_images):
        shape, colour = rng.choice(SHAPES), rng.choice(list(COLOURS))
        w, h = image_size
        name = f"{split}_{i:05d}.png"
        draw_shape(shape, colour, (w, h) if rng.random() < 0.5 else (h, w), rng).save(root / "images" / name)
        qas = [("What colour is the shape?", colour, "open")]
        if colour == probe or rng.random() < ask_absent:
            qas.append((f"Is there a {probe} shape in the image?", "yes" if colour == probe else "no", "closed"))
        for k, (q, a, qtype) in enumerate(qas):
            conv = [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]
            samples.append({"id": f"{split}-{i}-{k}", "image": name, "conversations": conv, "question_type": qtype, "answer": a})
    path = root / f"{split}.json"
    path.write_text(json.dumps(samples, indent=1), encoding="utf-8")
    return path


def make_texture_dataset(
    folder: str | Path, n_images: int = 300, seed: int = 0, split: str = "train", size: tuple[int, int] = (504, 168), cell: int = 6
) -> Path:
    """A task only high resolution can read: is the square in a large, wide (or tall) image checkered or plain grey?

    Both have the same mean colour. LLaVA-1.5's single view pads the image to a square and shrinks it whole (504 x 168
    to a 56-px tower: 9x), which averages `cell`-px checks to grey; AnyRes tiles it (a 3 x 1 grid: 3x), and the checks
    stay 2 px. Both answers are equally likely (chance 0.5). Samples carry `question_type: open` and `answer`.
    """
    root = Path(folder)
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    samples = []
    for i in range(n_images):
        answer = rng.choice(("checkered", "plain"))
        w, h = size if rng.random() < 0.5 else size[::-1]
        side = min(w, h) * 3 // 4
        im = Image.new("RGB", (w, h), (245, 245, 240))
        x, y = rng.randint(0, w - side), rng.randint(0, h - side)
        draw = ImageDraw.Draw(im)
        if answer == "plain":
            draw.rectangle([x, y, x + side - 1, y + side - 1], fill=(128, 128, 128))
        else:
            for r in range(0, side, cell):
                for c in range(0, side, cell):
                    dark = (r // cell + c // cell) % 2
                    box = [x + c, y + r, x + min(c + cell, side) - 1, y + min(r + cell, side) - 1]
                    draw.rectangle(box, fill=(0, 0, 0) if dark else (255, 255, 255))
        name = f"{split}_{i:05d}.png"
        im.save(root / "images" / name)
        conv = [{"from": "human", "value": "<image>\nIs the square checkered or plain?"}, {"from": "gpt", "value": answer}]
        samples.append({"id": f"{split}-{i}", "image": name, "conversations": conv, "question_type": "open", "answer": answer})
    path = root / f"{split}.json"
    path.write_text(json.dumps(samples, indent=1), encoding="utf-8")
    return path
