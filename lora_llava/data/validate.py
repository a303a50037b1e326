"""Every sample through the worker's path once: images decoded, text rendered, tokenised and fitted.

The index scan (`LlavaDataset` start-up) checks what the records say; this
checks what only the files and the tokenizer can tell: unreadable images and
samples whose prompt and image tokens do not fit `max_length`. `lora-llava
check` runs it on every dataset, and training runs it before the first step
(`data.validate: full`), in `data.num_workers` processes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ..errors import DataError
from .dataset import LlavaDataset
from .formats import SampleError

log = logging.getLogger(__name__)
LARGE = 50_000  # samples above which the full check before training is worth a warning (minutes, not seconds)


@dataclass
class Examination:
    """Per record (source, index) of a dataset: its token length, or why it is bad."""

    lengths: dict[tuple[int, int], int] = field(default_factory=dict)
    bad: list[tuple[int, SampleError]] = field(default_factory=list)  # (source, error)
    truncated: int = 0
    truncated_ids: list[tuple[int, str]] = field(default_factory=list)  # (source, sample id), in index order


class _Examine(torch.utils.data.Dataset):
    """One record per item; results are plain tuples so that they cross process boundaries."""

    def __init__(self, ds: LlavaDataset, items: list[tuple[int, int]]):
        self.ds, self.items = ds, items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, j: int) -> tuple:
        k, i = self.items[j]
        try:
            sample = self.ds.sources[k].sample(i)
            enc, _ = self.ds.encode_sample(sample, pixels=False)
        except SampleError as e:
            return k, i, None, None, (e.sample_id, e.kind, e.reason)
        except DataError as e:  # not about one sample (e.g. the template): stop, with the message intact
            return k, i, None, None, str(e)
        return k, i, len(enc.input_ids), sample.id if enc.truncated else None, None


def examine(ds: LlavaDataset, workers: int = 0) -> Examination:
    """Decode and encode every record that passed the index scan, once each (weights and caps aside)."""
    items = [(k, int(i)) for k, src in enumerate(ds.sources) for i in src.good]
    if len(items) > LARGE:
        log.warning(
            "checking %d samples (every image decoded) in %d worker process(es) before training; run `lora-llava check` "
            "once and set data.validate: index to start in seconds, or raise data.num_workers",
            len(items),
            max(workers, 1),
        )
    loader = torch.utils.data.DataLoader(_Examine(ds, items), batch_size=64, num_workers=workers, collate_fn=list)
    out = Examination()
    for batch in loader:
        for k, i, n, cut, err in batch:
            if isinstance(err, str):
                raise DataError(err)
            if err is not None:
                out.bad.append((k, SampleError(*err)))
            else:
                out.lengths[(k, i)] = n
                if cut is not None:  # the id of a sample cut to max_length
                    out.truncated += 1
                    out.truncated_ids.append((k, cut))
    return out


def validate(ds: LlavaDataset, workers: int = 0) -> Examination:
    """`examine`, then leave the bad records out of the mixture and add them to `ds.report`."""
    found = examine(ds, workers)
    if found.bad:
        ds.keep(set(found.lengths))
        names = list(ds.report.counts)
        ds.report.bad += [(names[k], e) for k, e in found.bad]
    return found
