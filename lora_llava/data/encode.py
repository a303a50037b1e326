"""A rendered sample -> input ids and labels, with image tokens expanded and never cut.

Labels come from character spans: a token is supervised when its characters
overlap an answer span. This is exact for any fast tokenizer, where LLaVA's
reference code has to count tokens per round and patch off-by-ones. With the
official templates (vicuna_v1, plain) the text is tokenised in pieces split at
each `<image>`, as the official code does (see `tokenize`); `chat_template`
follows the model's own processor and tokenises the text in one call.

`max_length` is met without cutting image tokens, which would make the model
raise "Image features and image tokens do not match": whole rounds are kept
while they fit; if the first round alone does not fit, the middle of its
question is cut (its start and end are kept, the answer stays whole), and only
an answer longer than the space left is cut at its end. A sample whose prompt
and image tokens alone exceed `max_length` raises `SampleError` (kind
`too long`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .formats import IMAGE_TAG, TAG_MISMATCH, TOO_LONG, SampleError
from .images import is_anyres
from .templates import Rendered

IGNORE_INDEX = -100
_FIXED, _QUESTION, _ANSWER = 0, 1, 2


@dataclass(frozen=True)
class Encoded:
    input_ids: list[int]
    labels: list[int]
    truncated: bool = False
    images: int = 0  # images whose tokens are in input_ids (the first `images` of the sample)


def image_token_count(image_size: int, patch_size: int, strategy: str = "default") -> int:
    """Tokens per image: one per patch; `full` keeps CLIP's CLS token, `default` drops it."""
    n = (image_size // patch_size) ** 2
    return n + 1 if strategy == "full" else n


def anyres_token_count(processor, width: int, height: int) -> int:
    """Image tokens of one image under AnyRes, counted as the processor and the model pack them (global view,
    unpadded tiles, a newline per row), the CLS token dropped by the `default` strategy."""
    size = processor.image_processor.size
    tile = size["shortest_edge"] if "shortest_edge" in size else min(size["height"], size["width"])
    n = processor._get_number_of_features(height, width, tile, tile)
    return n - 1 if processor.vision_feature_select_strategy == "default" else n


def image_token_counts(processor, images, fixed: int) -> int | list[int]:
    """What `encode` expands each `<image>` to: `fixed` for LLaVA-1.5, each image's own count under AnyRes."""
    if not is_anyres(processor.image_processor):
        return fixed
    return [anyres_token_count(processor, *im.size) for im in images]


def anyres_worst_case(processor) -> int:
    """The most image tokens one image can take: an image of each grid's own shape fills every tile."""
    grid = processor.image_processor.image_grid_pinpoints  # (height, width) pairs
    return max(anyres_token_count(processor, w, h) for h, w in grid)


def _in_spans(offsets: list[tuple[int, int]], spans) -> list[bool]:
    """For each token (start, end), whether its characters overlap one of the sorted, disjoint `spans`."""
    flags, j = [], 0
    for start, end in offsets:
        while j < len(spans) and spans[j][1] <= start:
            j += 1  # spans that end before this token end before every later one too
        flags.append(end > start and j < len(spans) and spans[j][0] < end)
    return flags


def tokenize(text: str, tokenizer, image_token_id: int, image_chunks: bool) -> tuple[list[int], list[tuple[int, int]]]:
    """Token ids of `text` (no BOS added) and each token's character span; one id per `<image>`.

    `image_chunks`: the text between `<image>` tags is tokenised piece by piece, as LLaVA's
    `tokenizer_image_token` does. With a SentencePiece tokenizer each piece then gets its dummy
    prefix, so the official sequence is `<image> ▁ <0x0A> What`, where one call on the whole text
    gives `<image> <0x0A> What` (non-legacy tokenizers, llava-hf's processor). A dummy prefix has
    the span of the character it precedes, so it is supervised or masked with that character.
    """
    if not image_chunks or IMAGE_TAG not in text:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    ids: list[int] = []
    offsets: list[tuple[int, int]] = []
    at = 0
    for k, chunk in enumerate(text.split(IMAGE_TAG)):
        if k:
            ids.append(image_token_id)
            offsets.append((at, at + len(IMAGE_TAG)))
            at += len(IMAGE_TAG)
        if chunk:  # an empty piece adds nothing (LLaVA drops the BOS of every piece but the first)
            enc = tokenizer(chunk, add_special_tokens=False, return_offsets_mapping=True)
            ids += enc["input_ids"]
            offsets += [(at + a, at + b) for a, b in enc["offset_mapping"]]
        at += len(chunk)
    return ids, offsets


def encode(
    rendered: Rendered,
    tokenizer,
    image_token_id: int,
    tokens_per_image: int | Sequence[int],
    max_length: int,
    sample_id: str,
) -> Encoded:
    """Tokenise, expand each `<image>` to its image tokens, fit into `max_length` (see the module doc).

    `tokens_per_image`: one count for every image (LLaVA-1.5), or one per image in tag order (AnyRes).
    """
    tokens, offsets = tokenize(rendered.text, tokenizer, image_token_id, rendered.image_chunks)
    n_tags = sum(1 for t in tokens if t == image_token_id)
    counts = [tokens_per_image] * n_tags if isinstance(tokens_per_image, int) else list(tokens_per_image)
    if len(counts) != n_tags:
        raise SampleError(sample_id, TAG_MISMATCH, f"{n_tags} {IMAGE_TAG} tag(s) for {len(counts)} image(s)")
    pending = iter(counts)
    ids: list[int] = []
    labels: list[int] = []
    kinds: list[int] = []
    ends: list[int] = []  # token position where each round ends
    round_ends = list(rendered.round_ends)
    bos = tokenizer.bos_token_id
    if bos is not None and (not tokens or tokens[0] != bos):
        ids.append(bos)
        labels.append(IGNORE_INDEX)
        kinds.append(_FIXED)
    answer, question = _in_spans(offsets, rendered.supervised), _in_spans(offsets, rendered.questions)
    for p, (tok, (start, _)) in enumerate(zip(tokens, offsets)):
        while round_ends and start >= round_ends[0]:
            ends.append(len(ids))
            round_ends.pop(0)
        if tok == image_token_id:
            n = next(pending)
            ids.extend([image_token_id] * n)
            labels.extend([IGNORE_INDEX] * n)
            kinds.extend([_FIXED] * n)
            continue
        ids.append(tok)
        labels.append(tok if answer[p] else IGNORE_INDEX)
        kinds.append(_ANSWER if answer[p] else _QUESTION if question[p] else _FIXED)
    ends.extend([len(ids)] * len(round_ends))
    if len(ids) <= max_length:
        return Encoded(ids, labels, False, _images(ids, image_token_id, counts))
    fitting = [e for e in ends if e <= max_length]
    if fitting:
        keep = list(range(fitting[-1]))
    else:
        keep = _fit_first_round(kinds[: ends[0] if ends else len(ids)], max_length, len(ids), sample_id)
    kept_ids = [ids[p] for p in keep]
    return Encoded(kept_ids, [labels[p] for p in keep], True, _images(kept_ids, image_token_id, counts))


def _fit_first_round(kinds: list[int], max_length: int, total: int, sample_id: str) -> list[int]:
    """Positions of the first round to keep: every fixed token, the answer whole if it fits, the question's ends."""
    fixed = [p for p, k in enumerate(kinds) if k == _FIXED]
    question = [p for p, k in enumerate(kinds) if k == _QUESTION]
    answer = [p for p, k in enumerate(kinds) if k == _ANSWER]
    budget = max_length - len(fixed)
    if budget < 1 or not answer:
        raise SampleError(
            sample_id,
            TOO_LONG,
            f"{total} tokens; its prompt and image tokens alone take {len(fixed)}, max_length is {max_length}",
        )
    if len(answer) <= budget:
        n_question = min(len(question), budget - len(answer))
    else:
        n_question = min(len(question), budget // 2)
    head = (n_question + 1) // 2
    kept_question = question[:head] + question[len(question) - (n_question - head) :] if n_question else []
    kept_answer = answer[: budget - n_question]
    return sorted(fixed + kept_question + kept_answer)


def _images(ids: list[int], image_token_id: int, counts: list[int]) -> int:
    """How many of the sample's images (in order) have their tokens in `ids`: truncation keeps or drops images whole."""
    n = sum(1 for t in ids if t == image_token_id)
    total = 0
    for k, c in enumerate(counts):
        if total == n:
            return k
        total += c
    if total != n:  # truncation never cuts an image; this would be a bug here
        raise AssertionError(f"{n} image tokens are not whole images of {counts}")
    return len(counts)
