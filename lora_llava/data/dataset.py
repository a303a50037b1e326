"""The training dataset: a mixture of dataset files, read lazily, one sample at a time.

Start-up reads each dataset's index and validates its structure (roles, turn
order, tag/image counts, image paths). Images are decoded and text tokenised
in `__getitem__`, i.e. in DataLoader workers. What can only be found there
(a corrupt image, a sample that cannot fit `max_length`) is skipped, replaced
by the next good sample, logged with its id and counted, so that a run never
dies in its middle; `lora-llava check` finds such samples beforehand.
"""

from __future__ import annotations

import io
import logging
import math
import random
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ..errors import DataError
from ..recipe import DatasetSpec
from .encode import Encoded, encode, image_token_count
from .formats import IMAGE_TAG, Sample, SampleError, detect_format, read_records, resolve_image, to_sample
from .images import open_image, pixel_values, to_rgb
from .templates import render

log = logging.getLogger(__name__)


@dataclass
class ScanReport:
    """What validating the index found: counts per dataset, and the bad samples."""

    counts: dict[str, int] = field(default_factory=dict)
    bad: list[tuple[str, SampleError]] = field(default_factory=list)  # (dataset path, error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def by_kind(self) -> dict[str, list[tuple[str, SampleError]]]:
        out: dict[str, list] = {}
        for path, err in self.bad:
            out.setdefault(err.kind, []).append((path, err))
        return out


class _Source:
    """One dataset file: its records, format and spec."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.fmt = detect_format(spec)
        self.records = read_records(spec)
        if self.fmt == "hf":
            self.records = _lazy_images(self.records)

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, i: int, allow_absolute: bool) -> Sample:
        s = to_sample(self.records[i], i, self.spec, self.fmt)
        images = tuple(resolve_image(p, self.spec, s.id, allow_absolute) for p in s.images)
        return Sample(s.id, s.turns, images, s.system)


def _lazy_images(ds):
    """Keep HF image columns undecoded: the index scan must not decode every image."""
    import datasets

    feat = ds.features.get("images")
    inner = getattr(feat, "feature", None)
    if isinstance(inner, datasets.Image) and inner.decode:
        ds = ds.cast_column("images", datasets.List(datasets.Image(decode=False)))
    return ds


def _load_image(img: Any) -> Image.Image:
    if isinstance(img, Image.Image):
        return to_rgb(img)
    if isinstance(img, dict):  # datasets Image(decode=False): {"bytes", "path"}
        if img.get("bytes"):
            try:
                with Image.open(io.BytesIO(img["bytes"])) as im:
                    im.load()
                    from PIL import ImageOps

                    return to_rgb(ImageOps.exif_transpose(im))
            except OSError as e:
                raise DataError(f"unreadable image bytes ({e})") from None
        img = img.get("path")
    return open_image(img)


def _weighted_indices(n: int, spec: DatasetSpec, rng: random.Random) -> list[int]:
    """Indices of one dataset in a mixture: capped by max_samples, scaled by weight."""
    idx = list(range(n))
    if spec.max_samples is not None and spec.max_samples < n:
        idx = sorted(rng.sample(idx, spec.max_samples))
    if spec.weight is not None:
        target = max(1, round(spec.weight * len(idx)))
        whole, rest = divmod(target, len(idx))
        idx = idx * whole + sorted(rng.sample(idx, rest))
    return idx


class LlavaDataset(torch.utils.data.Dataset):
    """Samples of one or more datasets, encoded for LlavaForConditionalGeneration."""

    def __init__(
        self,
        specs: tuple[DatasetSpec, ...],
        processor,
        template: str,
        max_length: int,
        image_aspect: str = "pad",
        system_prompt: str | None = None,
        allow_absolute_paths: bool = False,
        seed: int = 0,
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.max_length = max_length
        self.image_aspect = image_aspect
        self.system_prompt = system_prompt
        self.allow_absolute = allow_absolute_paths
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TAG)
        self.tokens_per_image = tokens_per_image(processor)
        self.sources = [_Source(spec) for spec in specs]
        rng = random.Random(seed)
        self.index: list[tuple[int, int]] = []
        for k, src in enumerate(self.sources):
            self.index.extend((k, i) for i in _weighted_indices(len(src), src.spec, rng))
        self.bad: set[tuple[int, int]] = set()

    def __len__(self) -> int:
        return len(self.index)

    def scan(self) -> ScanReport:
        """Validate every sample's structure and image paths (no decoding); remember the bad ones."""
        report = ScanReport()
        for k, src in enumerate(self.sources):
            report.counts[src.spec.path] = len(src)
            for i in range(len(src)):
                try:
                    s = src.sample(i, self.allow_absolute)
                    for p in s.images:
                        if not isinstance(p, (dict, Image.Image)) and not _exists(p):
                            raise SampleError(s.id, "missing image", f"image {p} not found")
                        if isinstance(p, dict) and not p.get("bytes") and not _exists(p.get("path")):
                            raise SampleError(s.id, "missing image", f"image {p.get('path')} not found")
                except SampleError as e:
                    report.bad.append((src.spec.path, e))
                    self.bad.add((k, i))
        return report

    def drop_bad(self) -> None:
        self.index = [ki for ki in self.index if ki not in self.bad]

    def sample(self, idx: int) -> Sample:
        k, i = self.index[idx]
        return self.sources[k].sample(i, self.allow_absolute)

    def encode_sample(self, s: Sample) -> tuple[Encoded, torch.Tensor | None]:
        """Tokens, labels and pixel values of one sample (raises SampleError / DataError)."""
        rendered = render(s, self.template, self.tokenizer, self.system_prompt)
        enc = encode(rendered, self.tokenizer, self.image_token_id, self.tokens_per_image, self.max_length, s.id)
        pixels = None
        if s.images:
            try:
                imgs = [_load_image(p) for p in s.images]
            except DataError as e:
                raise SampleError(s.id, "unreadable image", str(e)) from None
            pixels = pixel_values(imgs, self.processor.image_processor, self.image_aspect)
        return enc, pixels

    def __getitem__(self, idx: int) -> dict:
        skipped = []
        for attempt in range(len(self.index)):
            j = (idx + attempt) % len(self.index)
            try:
                s = self.sample(j)
                enc, pixels = self.encode_sample(s)
            except SampleError as e:
                log.warning("skipping %s", e)
                skipped.append(e.sample_id)
                continue
            return {
                "input_ids": torch.tensor(enc.input_ids),
                "labels": torch.tensor(enc.labels),
                "pixel_values": pixels,
                "skipped": skipped,
            }
        raise DataError("no usable sample in the training data (see the warnings above)")

    def modality_lengths(self) -> list[int]:
        """Cheap length estimates as LLaVA computes them: words (+ image tokens); negative for text-only."""
        out = []
        for k, i in self.index:
            rec = self.sources[k].records[i]
            conv = rec.get("conversations") or rec.get("messages") or []
            words = 0
            for m in conv:
                text = m.get("value", m.get("content")) if isinstance(m, dict) else ""
                words += len(text.split()) if isinstance(text, str) else 8
            has_image = bool(rec.get("image") or rec.get("images"))
            out.append(words + self.tokens_per_image if has_image else -max(words, 1))
        return out


def _exists(p: Any) -> bool:
    import os

    return isinstance(p, (str, os.PathLike)) and os.path.isfile(p)


def tokens_per_image(processor) -> int:
    """Image tokens per image for this processor's image size and the model's feature strategy."""
    ip = processor.image_processor
    size = ip.crop_size["height"] if getattr(ip, "do_center_crop", False) else ip.size.get("height", ip.size.get("shortest_edge"))
    patch = getattr(processor, "patch_size", None) or 14
    strategy = getattr(processor, "vision_feature_select_strategy", None) or "default"
    return image_token_count(size, patch, strategy)


def collate(batch: list[dict], pad_token_id: int) -> dict:
    """Right-pad to the longest sample; stack all images of the batch in order."""
    longest = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), longest), pad_token_id, dtype=torch.long)
    labels = torch.full((len(batch), longest), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for r, b in enumerate(batch):
        n = len(b["input_ids"])
        ids[r, :n] = b["input_ids"]
        labels[r, :n] = b["labels"]
        mask[r, :n] = 1
    out = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [b["pixel_values"] for b in batch if b["pixel_values"] is not None]
    if pixels:
        out["pixel_values"] = torch.cat(pixels)
    skipped = [sid for b in batch for sid in b.get("skipped", [])]
    if skipped:
        out["skipped"] = skipped
    return out


class ModalityLengthSampler(torch.utils.data.Sampler):
    """LLaVA-1.5's modality-length grouping.

    Image samples and text-only samples are shuffled separately and cut into
    megabatches of `megabatch` samples (world size x batch x accumulation);
    each megabatch is sorted by length, so every batch holds one modality and
    similar lengths, and the megabatches are shuffled. Deterministic per
    (seed, epoch), which makes resumed runs see the same order.
    """

    def __init__(self, lengths: list[int], megabatch: int, seed: int = 0):
        self.lengths = lengths
        self.megabatch = max(1, megabatch)
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        groups = [[i for i, n in enumerate(self.lengths) if n > 0], [i for i, n in enumerate(self.lengths) if n <= 0]]
        megabatches, leftovers = [], []
        for group in groups:
            rng.shuffle(group)
            for start in range(0, len(group), self.megabatch):
                chunk = sorted(group[start : start + self.megabatch], key=lambda i: -abs(self.lengths[i]))
                (megabatches if len(chunk) == self.megabatch else leftovers).append(chunk)
        rng.shuffle(megabatches)
        # The two partial megabatches go last, together, as in the reference sampler.
        tail = [i for chunk in leftovers for i in chunk]
        return iter([i for mb in megabatches for i in mb] + tail)


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of padding tokens when `order` is cut into batches of `batch_size`."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [abs(lengths[i]) for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 0.0 if padded == 0 else 1 - real / padded


def expected_steps(n_samples: int, batch_size: int, grad_accum: int, world_size: int, epochs: float) -> int:
    per_epoch = math.ceil(n_samples / (batch_size * world_size)) // grad_accum or 1
    return math.ceil(per_epoch * epochs)
