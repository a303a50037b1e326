"""Samples per second per DataLoader worker for the full per-sample pipeline.

    python benchmarks/data_throughput.py                    # 200 photos, 336 px (LLaVA-1.5's tower)
    python benchmarks/data_throughput.py --samples 400 --workers 2

Generates 640x480 JPEG photos (smooth colour fields, shapes and sensor noise,
so they compress like photographs) with multi-turn conversations of 3-6
rounds in LLaVA JSON, and a processor with LLaVA-1.5's image settings (336 px,
14 px patches: 576 image tokens). Then it times `LlavaDataset.__getitem__`,
the work a DataLoader worker does per sample: parse the record, validate it,
render the vicuna_v1 prompt, tokenise and build labels, decode the JPEG,
apply EXIF, pad to a square with the mean colour, resize and normalise; and
the per-sample work of `lora-llava check` (decode and encode, no resize).
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

QUESTIONS = (
    "What is shown in this photo?",
    "What colour is the car on the left?",
    "How many people are there?",
    "Is it daytime?",
)


def _photo(rng: random.Random, size=(640, 480)) -> Image.Image:
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    base = np.stack([(x * rng.random() + y * rng.random()) % 256 for _ in range(3)], axis=-1)
    im = Image.fromarray(base.astype(np.uint8)).filter(ImageFilter.GaussianBlur(3))
    d = ImageDraw.Draw(im)
    for _ in range(12):
        x0, y0 = rng.randrange(w), rng.randrange(h)
        d.ellipse(
            [x0, y0, x0 + rng.randrange(20, 200), y0 + rng.randrange(20, 200)], fill=tuple(rng.randrange(256) for _ in range(3))
        )
    noise = np.random.default_rng(rng.randrange(1 << 30)).normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(im, dtype=np.float64) + noise, 0, 255).astype(np.uint8))


def write_data(root: Path, n: int, seed: int = 0) -> Path:
    rng = random.Random(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        _photo(rng).save(root / "images" / f"{i:05d}.jpg", quality=90)
        conv = []
        for k in range(rng.randint(3, 6)):
            q = rng.choice(QUESTIONS)
            a = " ".join(rng.choices("a red car is parked near the white building on a sunny day".split(), k=rng.randint(3, 40)))
            conv += [{"from": "human", "value": ("<image>\n" if k == 0 else "") + q}, {"from": "gpt", "value": a}]
        records.append({"id": f"photo-{i}", "image": f"{i:05d}.jpg", "conversations": conv})
    (root / "train.json").write_text(json.dumps(records), encoding="utf-8")
    return root / "train.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--image-size", type=int, default=336)
    parser.add_argument("--workers", type=int, default=2, help="also time a DataLoader with this many workers (0: skip)")
    args = parser.parse_args()

    import torch

    from lora_llava.data.dataset import LlavaDataset, collate
    from lora_llava.data.validate import examine
    from lora_llava.model.processor import build_processor
    from lora_llava.model.tiny import build_tokenizer
    from lora_llava.recipe.schema import DatasetSpec

    processor = build_processor(build_tokenizer(), args.image_size, 14)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_data(Path(tmp), args.samples)
        ds = LlavaDataset((DatasetSpec(path=str(path), image_folder=str(Path(tmp) / "images")),), processor, "vicuna_v1", 4096)
        ds[0]  # warm up (imports, first allocations)
        t, cpu = time.perf_counter(), time.process_time()
        tokens = sum(len(ds[i]["input_ids"]) for i in range(len(ds)))
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        print(f"{len(ds)} samples of 640x480 JPEG + {tokens / len(ds):.0f} tokens on average, images to {args.image_size} px")
        print(
            f"one worker: {len(ds) / wall:.1f} samples/s ({1000 * wall / len(ds):.1f} ms/sample wall, {1000 * cpu / len(ds):.1f} ms CPU)"
        )
        t, cpu = time.perf_counter(), time.process_time()
        examine(ds)  # what `lora-llava check` and data.validate: full do per sample: decode + encode, no resize
        wall, cpu = time.perf_counter() - t, time.process_time() - cpu
        print(f"check (decode + encode): {len(ds) / wall:.1f} samples/s ({1000 * cpu / len(ds):.1f} ms CPU per sample)")
        if args.workers:
            pad = processor.tokenizer.pad_token_id
            loader = torch.utils.data.DataLoader(ds, batch_size=8, num_workers=args.workers, collate_fn=lambda b: collate(b, pad))
            t = time.perf_counter()
            n = sum(batch["input_ids"].shape[0] for batch in loader)
            wall = time.perf_counter() - t
            print(
                f"DataLoader, {args.workers} workers: {n / wall:.1f} samples/s in all ({n / wall / args.workers:.1f} per worker)"
            )


if __name__ == "__main__":
    main()
