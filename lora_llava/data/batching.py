"""Batching as LLaVA-1.5 does it: one modality per batch, similar lengths together.

LLaVA-1.5 mixes image samples with text-only ShareGPT conversations. Its
modality-length grouping keeps the two apart (a batch holds image samples or
text-only samples) and orders samples by length inside megabatches of
world size x batch x accumulation steps, which cuts padding. Lengths are
LLaVA's cheap ones: words of the conversation, negative for text-only samples.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

import torch


class ModalityLengthSampler(torch.utils.data.Sampler):
    """LLaVA-1.5's modality-length grouping, with no batch that mixes modalities.

    Image samples and text-only samples are shuffled separately and cut into
    megabatches of `megabatch` samples; each megabatch is sorted by length
    (longest first) and the megabatches are shuffled. The reference sampler
    merges the two partial megabatches into one mixed batch at the end; here
    the partial image megabatch is filled up with repeated image samples
    (fewer than `megabatch`) and the text-only one goes last, so every batch
    holds one modality. Deterministic per (seed, epoch), so a resumed run sees
    the same order.
    """

    def __init__(self, lengths: list[int], megabatch: int, seed: int = 0):
        self.lengths = lengths
        self.megabatch = max(1, megabatch)
        self.seed = seed
        self.epoch = 0
        images = sum(1 for n in lengths if n > 0)
        texts = len(lengths) - images
        pad = (-images) % self.megabatch if images and texts else 0
        self._len = len(lengths) + pad

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[int]:
        return iter(self.order())

    def order(self) -> list[int]:
        """The sample order of the current epoch."""
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        images = [i for i, n in enumerate(self.lengths) if n > 0]
        texts = [i for i, n in enumerate(self.lengths) if n <= 0]
        rng.shuffle(images)
        rng.shuffle(texts)
        if images and texts and len(images) % self.megabatch:
            images += rng.choices(images, k=(-len(images)) % self.megabatch)
        full, tails = [], []
        for group in (images, texts):
            chunks = [group[s : s + self.megabatch] for s in range(0, len(group), self.megabatch)]
            if chunks and len(chunks[-1]) < self.megabatch:
                tails.append(chunks.pop())
            full += chunks
        rng.shuffle(full)
        by_length = [sorted(c, key=lambda i: -abs(self.lengths[i])) for c in full + tails]
        return [i for chunk in by_length for i in chunk]


def padding_fraction(lengths: list[int], order: list[int], batch_size: int) -> float:
    """Share of padding tokens when `order` is cut into batches of `batch_size` (right padding to the longest)."""
    real = padded = 0
    for start in range(0, len(order), batch_size):
        batch = [abs(lengths[i]) for i in order[start : start + batch_size]]
        real += sum(batch)
        padded += max(batch) * len(batch)
    return 0.0 if padded == 0 else 1 - real / padded


def epoch_order(modality_lengths: list[int], grouped: bool, megabatch: int, seed: int) -> list[int]:
    """The order of one epoch: modality-length grouped, or a plain shuffle (what the Trainer does otherwise)."""
    if grouped:
        return ModalityLengthSampler(modality_lengths, megabatch, seed).order()
    order = list(range(len(modality_lengths)))
    random.Random(seed).shuffle(order)
    return order


def estimated_padding(dataset, batch_size: int, megabatch: int, grouped: bool, seed: int) -> float:
    """Padding share of one epoch of `dataset` (a LlavaDataset), on token lengths estimated from word counts."""
    order = epoch_order(dataset.modality_lengths(), grouped, megabatch, seed)
    return padding_fraction(dataset.token_length_estimates(), order, batch_size)
