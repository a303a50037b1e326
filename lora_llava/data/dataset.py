"""The training dataset: a mixture of datasets, read lazily, one sample at a time.

Start-up reads each dataset's index once and validates every record's
structure (roles, turn order, answers, tag/image counts) and image paths
(inside the image folder, present); bad samples are reported with their id
and left out of the mixture. Images are decoded and text tokenised in
`__getitem__`, i.e. in DataLoader workers. What only shows there (a corrupt
image, a sample that cannot fit `max_length`) is found before training by
`validate.validate` (`data.validate: full`, and `lora-llava check`); if one
still turns up in a worker, it is logged with its id, replaced by another
sample of the same modality and counted, so a run never dies in its middle.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..errors import DataError
from ..recipe.schema import DatasetSpec
from .columns import RecordReader, say_once
from .encode import Encoded, anyres_worst_case, encode, image_token_count, image_token_counts
from .formats import IMAGE_TAG, UNREADABLE_IMAGE, Sample, SampleError, to_sample
from .images import image_inputs, is_anyres, load_image, stack_image_inputs
from .paths import ImageResolver, image_folder
from .readers import EMBEDDED, ArrowRows, iter_hf, read_hf, read_llava, reads_as_json
from .templates import render

log = logging.getLogger(__name__)


@dataclass
class ScanReport:
    """Records per dataset, and the bad samples found (index scan, then `validate.validate` if it ran)."""

    counts: dict[str, int] = field(default_factory=dict)  # dataset path -> records
    bad: list[tuple[str, SampleError]] = field(default_factory=list)  # (dataset path, error)

    @property
    def total(self) -> int:
        return sum(self.counts.values())


class Source:
    """One dataset of a mixture: its records, and what the index scan found in each."""

    def __init__(self, spec: DatasetSpec, allow_absolute_paths: bool = False, where: str = "data.train.0"):
        self.spec, self.where = spec, where
        self.resolver = ImageResolver(image_folder(spec), allow_absolute_paths)
        self.bad: list[SampleError] = []
        self.read = RecordReader(spec, where)  # JSON; a table's columns replace it below
        self.filtered = 0  # records left out by the spec's filters (not bad: not wanted)
        words: list[int] = []
        images: list[int] = []
        good: list[int] = []

        def visit(i: int, record: Any) -> None:
            if not self.read.keep(record):
                self.filtered += 1
                words.append(0)
                images.append(0)
                return
            try:
                s = to_sample(self.read(record, i), i, spec)
                for ref in s.images:
                    if isinstance(ref, str) and ref != EMBEDDED:
                        self.resolver.check(ref, s.id)
            except SampleError as e:
                self.bad.append(e)
                words.append(0)
                images.append(0)
                return
            # LLaVA's cheap length for batching: words of the conversation.
            words.append(sum(len(text.split()) for _, text in s.turns))
            images.append(len(s.images))
            good.append(i)

        if reads_as_json(spec):
            self.records = read_llava(spec.path, visit)
        else:
            ds = read_hf(spec.path, spec.split)
            self.read = RecordReader(spec, where, ds.column_names)
            for i, row in enumerate(iter_hf(ds, image_columns=self.read.image_columns)):
                visit(i, row)
            self.records = ArrowRows(ds)
        if self.filtered:
            kept = len(self.records) - self.filtered
            if not kept:  # a filter on a field the records lack, or a value none has: never an empty dataset in silence
                fields = ", ".join(self.read.keys or ())
                raise DataError(f"{spec.path}: {where}.filters keep none of the {len(self.records)} records (the first has {fields})")
            say_once(f"{spec.path}: {kept} of {len(self.records)} record(s) pass {where}.filters")
        self.words = np.asarray(words, dtype=np.int32)
        self.images = np.asarray(images, dtype=np.int16)
        self.good = np.asarray(good, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.records)

    def sample(self, i: int) -> Sample:
        """Record i as a Sample whose images are checked paths or image data."""
        s = to_sample(self.read(self.records[i], i), i, self.spec)
        return dataclasses.replace(s, images=tuple(self._image(ref, s.id) for ref in s.images))

    def _image(self, ref: Any, sample_id: str) -> Any:
        if isinstance(ref, dict) and not ref.get("bytes") and isinstance(ref.get("path"), str):
            ref = ref["path"]  # an HF image column that stores paths only
        return self.resolver.resolve(ref, sample_id, must_exist=False) if isinstance(ref, str) else ref


def mixture_indices(good: np.ndarray, spec: DatasetSpec, rng: random.Random) -> list[int]:
    """Record indices of one dataset in a mixture: capped by max_samples, then scaled by weight."""
    idx = [int(i) for i in good]
    if spec.max_samples is not None and spec.max_samples < len(idx):
        idx = sorted(rng.sample(idx, spec.max_samples))
    if spec.weight is not None and idx:
        whole, rest = divmod(max(1, round(spec.weight * len(idx))), len(idx))
        idx = idx * whole + sorted(rng.sample(idx, rest))
    return idx


class LlavaDataset(torch.utils.data.Dataset):
    """Samples of one or more datasets, encoded for LlavaForConditionalGeneration."""

    @classmethod
    def for_recipe(cls, recipe, processor, specs: tuple[DatasetSpec, ...] | None = None) -> LlavaDataset:
        """The recipe's training mixture (or `specs`) with the recipe's template, lengths and image settings."""
        d = recipe.data
        return cls(
            d.train if specs is None else specs,
            processor,
            template=recipe.template,
            max_length=d.max_length,
            image_aspect=d.image_aspect,
            system_prompt=d.system_prompt,
            allow_absolute_paths=d.allow_absolute_paths,
            seed=recipe.train.seed,
            section="data.eval" if specs is not None and specs == d.eval and specs != d.train else "data.train",
        )

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
        section: str = "data.train",
    ):
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.template = template
        self.max_length = max_length
        self.image_aspect = image_aspect
        self.system_prompt = system_prompt
        if template == "chat_template" and not getattr(self.tokenizer, "chat_template", None):
            raise DataError("data.template: chat_template, but this model's tokenizer has no chat template (use vicuna_v1)")
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TAG)
        self.anyres = is_anyres(processor.image_processor)
        # AnyRes counts per image; this (its worst case there) serves the length estimates that decode nothing.
        self.tokens_per_image = anyres_worst_case(processor) if self.anyres else tokens_per_image(processor)
        self.sources = [Source(spec, allow_absolute_paths, f"{section}.{k}") for k, spec in enumerate(specs)]
        self.report = ScanReport()
        rng = random.Random(seed)
        source_ids, record_ids = [], []
        for k, src in enumerate(self.sources):
            key = src.spec.path if src.spec.path not in self.report.counts else f"{src.spec.path} ({k + 1})"
            self.report.counts[key] = len(src) - src.filtered
            self.report.bad += [(key, e) for e in src.bad]
            picked = mixture_indices(src.good, src.spec, rng)
            source_ids += [k] * len(picked)
            record_ids += picked
        self._source = np.asarray(source_ids, dtype=np.int16)
        self._record = np.asarray(record_ids, dtype=np.int64)

    def __len__(self) -> int:
        return len(self._record)

    def keep(self, records: set[tuple[int, int]]) -> None:
        """Leave out of the mixture every entry whose (source, record) is not in `records`."""
        mask = np.fromiter(((k, i) in records for k, i in zip(self._source.tolist(), self._record.tolist())), bool, len(self))
        self._source, self._record = self._source[mask], self._record[mask]

    def scan(self) -> ScanReport:
        """The bad samples found so far (index scan, and `validate.validate` if it ran); they are left out."""
        return self.report

    def sample(self, idx: int) -> Sample:
        return self.sources[self._source[idx]].sample(int(self._record[idx]))

    def has_image(self, idx: int) -> bool:
        return bool(self.sources[self._source[idx]].images[self._record[idx]])

    def encode_sample(self, s: Sample, pixels: bool = True) -> tuple[Encoded, dict | None]:
        """Tokens, labels and image inputs of the images kept (raises SampleError / DataError).

        `pixels=False` decodes the images (to find unreadable ones) but skips resizing and normalising.
        """
        rendered = render(s, self.template, self.tokenizer, self.system_prompt)
        try:
            images = [load_image(ref) for ref in s.images]
        except DataError as e:
            raise SampleError(s.id, UNREADABLE_IMAGE, str(e)) from None
        counts = image_token_counts(self.processor, images, self.tokens_per_image)  # AnyRes: as the model packs them
        enc = encode(rendered, self.tokenizer, self.image_token_id, counts, self.max_length, s.id)
        if not pixels or not enc.images:
            return enc, None
        # Truncation may drop later rounds with their images: feed only the images whose tokens remain.
        return enc, image_inputs(images[: enc.images], self.processor.image_processor, self.image_aspect)

    def __getitem__(self, idx: int) -> dict:
        skipped = []
        modality = self.has_image(idx)
        for step in range(len(self)):
            j = (idx + step) % len(self)
            if self.has_image(j) != modality:
                continue  # a replacement keeps the batch to one modality
            try:
                enc, pixels = self.encode_sample(self.sample(j))
            except SampleError as e:
                log.warning("skipping %s", e)
                skipped.append(e.sample_id)
                continue
            return {
                "input_ids": torch.tensor(enc.input_ids),
                "labels": torch.tensor(enc.labels),
                "pixel_values": pixels["pixel_values"] if pixels else None,
                "image_sizes": pixels.get("image_sizes") if pixels else None,  # AnyRes only
                "skipped": skipped,
            }
        raise DataError(f"no usable {'image' if modality else 'text-only'} sample in the data (see the warnings above)")

    def modality_lengths(self) -> list[int]:
        """LLaVA's lengths for batching: words of the conversation, negative for text-only samples."""
        words = np.maximum(self._words(), 1)
        return np.where(self._images() > 0, words, -words).tolist()

    def _per_sample(self, column: str) -> np.ndarray:
        """A per-record column of the sources (`words`, `images`), in mixture order."""
        out = np.zeros(len(self), dtype=np.int64)
        for k, src in enumerate(self.sources):
            mask = self._source == k
            out[mask] = getattr(src, column)[self._record[mask]]
        return out

    def _words(self) -> np.ndarray:
        return self._per_sample("words")

    def _images(self) -> np.ndarray:
        return self._per_sample("images")

    def token_length_estimates(self, probe: int = 256, seed: int = 0) -> list[int]:
        """Token lengths from word counts, the tokens-per-word fit measured on `probe` random samples."""
        words, images = self._words(), self._images()
        picks = random.Random(seed).sample(range(len(self)), min(probe, len(self)))
        xs, ys = [], []
        for j in picks:
            s = self.sample(j)
            try:
                rendered = render(s, self.template, self.tokenizer, self.system_prompt)
                enc = encode(rendered, self.tokenizer, self.image_token_id, self.tokens_per_image, 10**9, s.id)
            except SampleError:
                continue
            xs.append(words[j])
            ys.append(len(enc.input_ids) - self.tokens_per_image * images[j])
        if not xs:
            return [self.max_length] * len(self)
        a = np.stack([np.ones(len(xs)), np.asarray(xs, dtype=np.float64)], axis=1)
        (offset, per_word), *_ = np.linalg.lstsq(a, np.asarray(ys, dtype=np.float64), rcond=None)
        est = offset + per_word * words + self.tokens_per_image * images
        return np.clip(np.round(est), 1, self.max_length).astype(np.int64).tolist()


def tokens_per_image(processor) -> int:
    """Image tokens per image: the processor's output size in patches, plus CLS for the `full` strategy."""
    probe = processor.image_processor(images=[Image.new("RGB", (32, 32))], return_tensors="pt", do_pad=False)
    side = int(probe["pixel_values"].shape[-1])
    patch = getattr(processor, "patch_size", None) or 14
    strategy = getattr(processor, "vision_feature_select_strategy", None) or "default"
    return image_token_count(side, patch, strategy)


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
    parts = [{k: b[k] for k in ("pixel_values", "image_sizes") if b.get(k) is not None} for b in batch]
    out.update(stack_image_inputs(parts))
    skipped = [sid for b in batch for sid in b.get("skipped", [])]
    if skipped:
        out["skipped"] = skipped
    return out
