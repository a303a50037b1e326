"""A rendered sample -> input ids and labels, with image tokens expanded and never cut.

Labels come from character spans: a token is supervised when its characters
overlap an answer span. This is exact for any fast tokenizer, where LLaVA's
reference code has to count tokens per round and patch off-by-ones.
"""

from __future__ import annotations

from dataclasses import dataclass

from .formats import SampleError
from .templates import Rendered

IGNORE_INDEX = -100


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False


def image_token_count(image_size: int, patch_size: int, strategy: str = "default") -> int:
    """Tokens per image: one per patch; `full` keeps CLIP's CLS token, `default` drops it."""
    n = (image_size // patch_size) ** 2
    return n + 1 if strategy == "full" else n


def encode(
    rendered: Rendered,
    tokenizer,
    image_token_id: int,
    tokens_per_image: int,
    max_length: int,
    sample_id: str,
) -> Encoded:
    """Tokenise, expand each `<image>` to `tokens_per_image` ids, fit into `max_length`.

    Over-long samples keep as many whole rounds as fit; if the first round alone
    is too long, its answer is cut after the image tokens. A sample whose image
    tokens (or first answer token) cannot fit raises `SampleError`.
    """
    enc = tokenizer(rendered.text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = []
    labels: list[int] = []
    ends: list[int] = []  # expanded position where each round ends
    round_ends = list(rendered.round_ends)
    bos = tokenizer.bos_token_id
    if bos is not None and (not enc["input_ids"] or enc["input_ids"][0] != bos):
        ids.append(bos)
        labels.append(IGNORE_INDEX)
    spans = rendered.supervised
    for tok, (start, end) in zip(enc["input_ids"], enc["offset_mapping"]):
        while round_ends and start >= round_ends[0]:
            ends.append(len(ids))
            round_ends.pop(0)
        if tok == image_token_id:
            ids.extend([image_token_id] * tokens_per_image)
            labels.extend([IGNORE_INDEX] * tokens_per_image)
            continue
        supervised = end > start and any(start < e and end > s for s, e in spans)
        ids.append(tok)
        labels.append(tok if supervised else IGNORE_INDEX)
    ends.extend([len(ids)] * len(round_ends))
    if len(ids) <= max_length:
        return Encoded(ids, labels)
    fitting = [e for e in ends if e <= max_length]
    if fitting:
        cut = fitting[-1]
    else:
        last_image = max((i for i, t in enumerate(ids) if t == image_token_id), default=-1)
        if last_image >= max_length:
            raise SampleError(
                sample_id, "too long", f"{len(ids)} tokens; its image tokens end at {last_image + 1} > max_length {max_length}"
            )
        cut = max_length
        if all(lab == IGNORE_INDEX for lab in labels[:cut]):
            raise SampleError(sample_id, "too long", f"{len(ids)} tokens; no answer token fits in max_length {max_length}")
    return Encoded(ids[:cut], labels[:cut], truncated=True)
