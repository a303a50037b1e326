"""`lora-llava check`: validate a recipe and every sample of its datasets, without model weights.

Every record of every dataset (train and eval) goes through what training does
to it, with the processor and tokenizer only: structure and image paths (as
the index scan at start-up), then each image decoded and the text rendered,
tokenised and fitted into `data.max_length` (as a DataLoader worker does).
The report lists sample counts, bad samples by kind with the first offenders,
token-length percentiles and the padding an epoch would carry; the check fails
when the share of bad samples exceeds `data.max_bad_fraction`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .data.batching import epoch_order, padding_fraction
from .data.dataset import LlavaDataset
from .data.formats import SampleError
from .data.validate import examine
from .model.build import load_check_processor
from .recipe.schema import Recipe

SHOWN_PER_KIND = 5


@dataclass
class DatasetCount:
    split: str  # train | eval
    path: str
    records: int
    bad: int = 0
    in_mixture: int = 0


@dataclass
class CheckReport:
    """What `check` found; `failed` when a split's bad share exceeds `max_bad_fraction`."""

    datasets: list[DatasetCount]
    bad: list[tuple[str, str, SampleError]]  # (split, dataset path, error)
    truncated: int
    lengths: list[int]  # token lengths of the good training records
    padding: float | None
    batch_size: int
    grouped: bool
    max_bad_fraction: float
    header: str = ""
    truncated_samples: list[tuple[str, str, str]] = field(default_factory=list)  # (split, dataset path, sample id)
    kinds: dict[str, list[tuple[str, str, SampleError]]] = field(init=False)

    def __post_init__(self):
        self.kinds = {}
        for item in self.bad:
            self.kinds.setdefault(item[2].kind, []).append(item)

    def share(self, split: str) -> float:
        total = sum(d.records for d in self.datasets if d.split == split)
        return sum(d.bad for d in self.datasets if d.split == split) / total if total else 0.0

    @property
    def failed(self) -> bool:
        return any(self.share(s) > self.max_bad_fraction for s in ("train", "eval"))

    def to_dict(self) -> dict:
        """The report as plain data (for `--json`): every bad sample, not only the first of each kind."""
        return {
            "datasets": [vars(d) for d in self.datasets],
            "bad": [{"split": s, "path": p, "id": e.sample_id, "kind": e.kind, "reason": e.reason} for s, p, e in self.bad],
            "truncated": self.truncated,
            "truncated_samples": [{"split": s, "path": p, "id": sid} for s, p, sid in self.truncated_samples],
            "token_lengths": {f"p{q}": float(np.percentile(self.lengths, q)) for q in (50, 90, 95, 99)} if self.lengths else {},
            "padding_fraction": self.padding,
            "max_bad_fraction": self.max_bad_fraction,
            "failed": self.failed,
        }

    def format(self) -> str:
        lines = [self.header, "datasets:"] if self.header else ["datasets:"]
        for d in self.datasets:
            mix = f", {d.in_mixture:,} in the mixture" if d.split == "train" and d.in_mixture != d.records - d.bad else ""
            lines.append(f"  {d.split:<5} {d.path}: {d.records:,} samples, {d.bad:,} bad{mix}")
        lines.append("bad samples by kind:" if self.kinds else "bad samples: none")
        for kind, items in sorted(self.kinds.items(), key=lambda kv: -len(kv[1])):
            lines.append(f"  {kind}: {len(items):,}")
            for _, path, err in items[:SHOWN_PER_KIND]:
                lines.append(f"    {path}: sample {err.sample_id}: {err.reason}")
            if len(items) > SHOWN_PER_KIND:
                lines.append(f"    ... and {len(items) - SHOWN_PER_KIND:,} more")
        if self.truncated:
            lines.append(f"truncated to data.max_length (image tokens kept): {self.truncated:,} samples")
            for _, path, sid in self.truncated_samples[:SHOWN_PER_KIND]:
                lines.append(f"    {path}: sample {sid}")
            if len(self.truncated_samples) > SHOWN_PER_KIND:
                lines.append(f"    ... and {len(self.truncated_samples) - SHOWN_PER_KIND:,} more")
        if self.lengths:
            p = np.percentile(self.lengths, [50, 90, 95, 99]).round().astype(int)
            lines.append(f"token lengths (train): p50 {p[0]}, p90 {p[1]}, p95 {p[2]}, p99 {p[3]}, max {max(self.lengths)}")
        if self.padding is not None:
            how = "modality-length grouping" if self.grouped else "random batches"
            lines.append(f"expected padding: {self.padding:.1%} of the tokens of an epoch (batch {self.batch_size}, {how})")
        shares = ", ".join(f"{s} {self.share(s):.2%}" for s in ("train", "eval") if any(d.split == s for d in self.datasets))
        verdict = "FAIL" if self.failed else "ok"
        lines.append(f"{verdict}: bad share {shares} (data.max_bad_fraction {self.max_bad_fraction:g})")
        return "\n".join(lines)


def check(recipe: Recipe, processor=None, workers: int | None = None) -> CheckReport:
    """Validate every sample of the recipe's datasets (see the module doc); no model weights are loaded."""
    processor = processor if processor is not None else load_check_processor(recipe.model)
    d, t = recipe.data, recipe.train
    workers = d.num_workers if workers is None else workers
    counts, bad_all, truncated, lengths, padding, cut = [], [], 0, [], None, []
    for split, specs in (("train", d.train), ("eval", d.eval)):
        if not specs:
            continue
        ds = LlavaDataset.for_recipe(recipe, processor, specs)
        exam = examine(ds, workers)
        good, truncated = exam.lengths, truncated + exam.truncated
        found = [(k, e) for k, src in enumerate(ds.sources) for e in src.bad] + exam.bad
        bad_all += [(split, ds.sources[k].spec.path, e) for k, e in found]
        cut += [(split, ds.sources[k].spec.path, sid) for k, sid in exam.truncated_ids]
        in_mix = [0] * len(ds.sources)
        for key in zip(ds._source.tolist(), ds._record.tolist()):
            in_mix[key[0]] += key in good
        for k, src in enumerate(ds.sources):
            records = len(src) - src.filtered  # records the spec's filters leave out are not the data
            counts.append(DatasetCount(split, src.spec.path, records, sum(1 for kk, _ in found if kk == k), in_mix[k]))
        if split == "train":
            lengths = list(good.values())
            padding = _padding(ds, good, recipe)
    header = f"recipe: ok (stage {recipe.stage}, template {recipe.template}, max_length {d.max_length}, images {d.image_aspect})"
    return CheckReport(
        counts,
        bad_all,
        truncated,
        lengths,
        padding,
        t.batch_size,
        recipe.group_by_modality_length,
        d.max_bad_fraction,
        header,
        truncated_samples=cut,
    )


def _padding(ds: LlavaDataset, good: dict[tuple[int, int], int], recipe: Recipe) -> float | None:
    """Padding share of one epoch of the training mixture, on the exact token lengths."""
    keys = list(zip(ds._source.tolist(), ds._record.tolist()))
    keep = [j for j, key in enumerate(keys) if key in good]
    if not keep:
        return None
    modality = ds.modality_lengths()
    tokens = [good[keys[j]] for j in keep]
    t = recipe.train
    order = epoch_order([modality[j] for j in keep], recipe.group_by_modality_length, t.global_batch(), t.seed)
    return padding_fraction(tokens, order, t.batch_size)


