"""How long the training data takes to load at start-up: an index shaped like LLaVA-1.5's 665K mixture.

    python benchmarks/index_load.py                 # 665,000 entries (about 1 GB of JSON)
    python benchmarks/index_load.py --entries 50000

Writes a generated LLaVA JSON file whose mixture follows llava_v1_5_mix665k
(instruction chats, multi-turn short-answer VQA with the response-format
suffix, region captions, ShareGPT text-only conversations) with about the
real file's bytes per entry, images spread over a few folders of real JPEG
files, and a tiny model folder for the tokenizer. Then it times what
training does before its first step: read the index and validate every
record and image path (`LlavaDataset`), the lengths for modality grouping,
and the padding estimate. Nothing here decodes an image.
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import tempfile
import time
from pathlib import Path

from PIL import Image

WORDS = (
    "the a of image shows what is in on colour left right person man woman car table dog cat street sign building "
    "people standing sitting holding wearing white black red blue green large small front back near top bottom"
).split()
SUFFIX = "Answer the question using a single word or phrase."
FOLDERS = ("coco/train2017", "gqa/images", "ocr_vqa/images", "textvqa/train_images", "vg/VG_100K")
# (share of the 665K, kind) as in LLaVA-1.5's mixture
MIX = ((0.24, "instruct"), (0.06, "sharegpt"), (0.45, "vqa"), (0.13, "ocr"), (0.12, "region"))


def _text(rng: random.Random, n: int) -> str:
    return " ".join(rng.choices(WORDS, k=n)).capitalize() + "."


def _entry(i: int, kind: str, rng: random.Random, images_per_folder: int) -> dict:
    folder = rng.choice(FOLDERS)
    image = f"{folder}/{rng.randrange(images_per_folder):012d}.jpg"
    if kind == "instruct":
        rounds = [(_text(rng, rng.randint(6, 14)), _text(rng, rng.randint(30, 110))) for _ in range(rng.randint(1, 5))]
    elif kind == "sharegpt":
        rounds = [(_text(rng, rng.randint(10, 60)), _text(rng, rng.randint(80, 260))) for _ in range(rng.randint(1, 4))]
    elif kind == "vqa":
        rounds = [(f"{_text(rng, rng.randint(4, 10))}\n{SUFFIX}", rng.choice(WORDS)) for _ in range(rng.randint(2, 14))]
    elif kind == "ocr":
        rounds = [(_text(rng, rng.randint(5, 10)), _text(rng, rng.randint(1, 4))) for _ in range(rng.randint(3, 10))]
    else:
        rounds = [(f"Describe the region [0.{rng.randint(10, 99)}, 0.{rng.randint(10, 99)}].", _text(rng, 8)) for _ in range(6)]
    conv = []
    for k, (q, a) in enumerate(rounds):
        conv += [
            {"from": "human", "value": ("<image>\n" if k == 0 and kind != "sharegpt" else "") + q},
            {"from": "gpt", "value": a},
        ]
    entry = {"id": f"{kind}-{i}", "conversations": conv}
    if kind != "sharegpt":
        entry["image"] = image
    return entry


def write_index(root: Path, entries: int, images_per_folder: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    for folder in FOLDERS:
        (root / "images" / folder).mkdir(parents=True, exist_ok=True)
        for n in range(images_per_folder):
            Image.new("RGB", (8, 8), (n % 256, 0, 0)).save(root / "images" / folder / f"{n:012d}.jpg")
    kinds = rng.choices([k for _, k in MIX], weights=[w for w, _ in MIX], k=entries)
    path = root / "mix.json"
    with open(path, "w", encoding="utf-8") as f:
        f.write("[\n")
        for i, kind in enumerate(kinds):
            f.write(("," if i else "") + json.dumps(_entry(i, kind, rng, images_per_folder)) + "\n")
        f.write("]\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--entries", type=int, default=665_000)
    parser.add_argument("--workdir", help="keep the generated files here (default: a temporary folder)")
    args = parser.parse_args()

    from lora_llava.data.batching import epoch_order, padding_fraction
    from lora_llava.data.dataset import LlavaDataset
    from lora_llava.model.load import load_processor
    from lora_llava.model.tiny import make_tiny
    from lora_llava.recipe.schema import DatasetSpec

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.workdir or tmp)
        path = root / "mix.json"
        if not (path.is_file() and args.workdir):  # a kept workdir is reused as it is
            t = time.perf_counter()
            write_index(root, args.entries)
            print(f"generated in {time.perf_counter() - t:.0f} s")
        tiny = root / "tiny"
        processor = load_processor(str(tiny if (tiny / "config.json").is_file() else make_tiny(tiny, image_size=56)))

        t0, c0 = time.perf_counter(), time.process_time()
        ds = LlavaDataset((DatasetSpec(path=str(path), image_folder=str(root / "images")),), processor, "vicuna_v1", 2048)
        t1, c1 = time.perf_counter(), time.process_time()
        lengths = ds.modality_lengths()
        t2 = time.perf_counter()
        estimates = ds.token_length_estimates()
        padding = padding_fraction(estimates, epoch_order(lengths, True, 128, 0), 16)
        t3 = time.perf_counter()
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        size = path.stat().st_size
        print(f"index: {len(ds):,} entries, {size / 1e6:.0f} MB ({size / len(ds):.0f} B/entry)")
        print(
            f"index read + every record and image path validated: {t1 - t0:.1f} s wall, {c1 - c0:.1f} s CPU "
            f"({len(ds):,} samples, {len(ds.report.bad)} bad)"
        )
        print(f"modality lengths: {t2 - t1:.2f} s; token-length estimates + epoch padding ({padding:.1%}): {t3 - t2:.1f} s")
        print(f"start-up total: {t3 - t0:.1f} s; peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
