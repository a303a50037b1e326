"""Token for token LLaVA-1.5: lora-llava's ids and labels against the official code's, on a LLaMA-like tokenizer.

The expected ids come from `official_v1` / `official_plain` below, a re-implementation
(written from their description, not copied) of the official LLaVA code's
`preprocess_v1` / `preprocess_plain` with `tokenizer_image_token`
(llava/train/train.py, llava/mm_utils.py of haotian-liu/LLaVA):

* the prompt is `conv.get_prompt()` of `conv_vicuna_v1` (separators " " and "</s>");
* with images, the prompt is split at `<image>`, each chunk tokenised on its own with BOS,
  the BOS of every chunk but the first dropped, one image id between chunks;
* labels: BOS masked, then per round (the prompt split at "</s>", each round split at
  " ASSISTANT: " and the separator put back on the instruction) the first
  `len(tok(instruction)) - 2` tokens masked and `len(tok(round))` tokens passed; for rounds
  after the first a non-legacy tokenizer takes one off both; everything after the last round is
  masked; when the count does not end at the sequence length ("tokenization mismatch") the
  whole sample is masked. The official code pads with `<unk>` and counts it as padding.
* `preprocess_plain`: `<image>` + caption + "\\n", the first `len(tokenizer_image_token("<image>"))`
  tokens masked.

The official image id is -200; here it is the `<image>` id and lora-llava is run with one
token per image, so the two sequences compare position by position.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from PIL import Image

from lora_llava.data.encode import IGNORE_INDEX, encode, tokenize
from lora_llava.data.formats import Sample
from lora_llava.data.templates import VICUNA_SYSTEM, render
from tests.llama_like import llama_like_tokenizer

IMAGE = "<image>"


def official_prompt(turns) -> str:
    """`conv_vicuna_v1.get_prompt()`: system, then `ROLE: message` closed by " " (user) or "</s>" (assistant)."""
    text = VICUNA_SYSTEM + " "
    for k, (_, message) in enumerate(turns):
        text += ("USER" if k % 2 == 0 else "ASSISTANT") + ": " + message + (" " if k % 2 == 0 else "</s>")
    return text


def official_ids(text: str, tok, has_image: bool) -> list[int]:
    """`tokenizer_image_token` (chunks, BOS kept only on the first) or, without images, one tokenizer call."""
    if not has_image:
        return tok(text).input_ids
    chunks = [tok(c).input_ids for c in text.split(IMAGE)]
    keep_bos = bool(chunks[0]) and chunks[0][0] == tok.bos_token_id
    ids = [tok.bos_token_id] if keep_bos else []
    for k, chunk in enumerate(chunks):
        if k:
            ids.append(tok.convert_tokens_to_ids(IMAGE))
        ids += chunk[1:] if keep_bos else chunk
    return ids


def official_v1(turns, tok, has_image: bool) -> tuple[list[int], list[int], bool]:
    """(input ids, labels, masked for "tokenization mismatch") as `preprocess_v1` computes them."""
    text = official_prompt(turns)
    ids = official_ids(text, tok, has_image)
    labels = list(ids)
    labels[0] = IGNORE_INDEX
    cur, sep = 1, " ASSISTANT: "
    for k, rnd in enumerate(text.split("</s>")):
        parts = rnd.split(sep)
        if rnd == "" or len(parts) != 2:
            break
        round_len = len(official_ids(rnd, tok, has_image))
        instruction_len = len(official_ids(parts[0] + sep, tok, has_image)) - 2
        if k and not tok.legacy:
            round_len, instruction_len = round_len - 1, instruction_len - 1
        labels[cur : cur + instruction_len] = [IGNORE_INDEX] * len(labels[cur : cur + instruction_len])
        cur += round_len
    labels[cur:] = [IGNORE_INDEX] * len(labels[cur:])
    total = sum(1 for t in ids if t != tok.unk_token_id)
    mismatch = cur != total
    return ids, [IGNORE_INDEX] * len(ids) if mismatch else labels, mismatch


def official_plain(caption: str, tok) -> tuple[list[int], list[int]]:
    ids = official_ids(IMAGE + caption + "\n", tok, True)
    masked = len(official_ids(IMAGE, tok, True))
    return ids, [IGNORE_INDEX] * masked + ids[masked:]


def ours(turns, tok, template: str = "vicuna_v1", images: int = 1):
    sample = Sample("s", tuple(turns), ("a.png",) * images)
    rendered = render(sample, template, tok)
    return rendered, encode(rendered, tok, tok.convert_tokens_to_ids(IMAGE), 1, 10**6, "s")


Q = "<image>\nHow many lesions are there?"
SINGLE = {
    "digit": [("user", Q), ("assistant", "3")],
    "number": [("user", Q), ("assistant", "12 lesions")],
    "chinese": [("user", "<image>\n图像中有几个病变?"), ("assistant", "左肺")],
    "rare-cjk": [("user", "<image>\nWhich organ?"), ("assistant", "脾脏")],  # 脾 is not a piece: bytes
    "newline": [("user", Q), ("assistant", "\nthree lesions")],
    "letter": [("user", Q), ("assistant", "Yes")],
    "word": [("user", Q), ("assistant", "left lung")],
    "text-only-digit": [("user", "What is 2 plus 2?"), ("assistant", "4")],
}
MULTI = {
    "multi-digit-chinese": [("user", Q), ("assistant", "2"), ("user", "Which side?"), ("assistant", "左")],
    "multi-letter-newline": [("user", Q), ("assistant", "none"), ("user", "Why?"), ("assistant", "\nnormal scan")],
}
LONE_SPACE = {"digit", "number", "chinese", "rare-cjk", "newline", "text-only-digit"}


def _after_assistant(ids: list[int], tok) -> list[str]:
    """The token that follows each `ASSISTANT` `:`."""
    pieces = tok.convert_ids_to_tokens(ids)
    return [pieces[p + 2] for p in range(len(pieces) - 2) if pieces[p] == "▁ASSISTANT" and pieces[p + 1] == ":"]


@pytest.mark.parametrize("name", sorted(SINGLE))
def test_single_round_ids_and_labels_equal_the_official_code(llama_like, name):
    tok, turns = llama_like, SINGLE[name]
    has_image = IMAGE in turns[0][1]
    want_ids, want_labels, mismatch = official_v1(turns, tok, has_image)
    rendered, enc = ours(turns, tok, images=int(has_image))
    assert rendered.text == official_prompt(turns)
    assert not mismatch
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels
    # What makes the case: numeric, CJK and newline answers start with a lone "▁", and it is trained.
    first = _after_assistant(enc.input_ids, tok)
    assert (first == ["▁"]) == (name in LONE_SPACE), first
    start = next(p for p, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(enc.input_ids[start - 1 : start + 1])[0] == ":"


@pytest.mark.parametrize("name", sorted(MULTI))
def test_multi_round_labels_equal_the_official_code_where_it_does_not_mask_the_sample(llama_like, name):
    """With a non-legacy tokenizer the official code's later-round correction (-1) does not fit this
    vocabulary ("USER" after `</s>` is two pieces unprefixed, one with the dummy prefix), so it masks
    the whole sample; lora-llava supervises it as the legacy flavour shows the official code means to."""
    tok, turns = llama_like, MULTI[name]
    want_ids, want_labels, mismatch = official_v1(turns, tok, True)
    _, enc = ours(turns, tok)
    assert enc.input_ids == want_ids
    assert mismatch == (not tok.legacy)
    if tok.legacy:
        assert enc.labels == want_labels
    else:
        assert set(want_labels) == {IGNORE_INDEX}
        legacy = llama_like_tokenizer(legacy=True)
        _, enc_legacy = ours(turns, legacy)
        supervised = legacy.decode([t for t in enc_legacy.labels if t != IGNORE_INDEX])
        assert tok.decode([t for t in enc.labels if t != IGNORE_INDEX]) == supervised
    lone = [t == "▁" for t in _after_assistant(enc.input_ids, tok)]
    assert lone == {"multi-digit-chinese": [True, True], "multi-letter-newline": [False, True]}[name]


@pytest.mark.parametrize("name", sorted(SINGLE) + sorted(MULTI))
def test_the_space_token_is_the_only_label_change(llama_like, name):
    """Against the previous rule (supervision from the answer's first character): letter-first answers
    are unchanged; every other answer gains exactly its lone "▁", nothing else moves."""
    import dataclasses

    tok, turns = llama_like, {**SINGLE, **MULTI}[name]
    rendered, enc = ours(turns, tok, images=int(IMAGE in turns[0][1]))
    before = dataclasses.replace(rendered, supervised=tuple((a + 1, b) for a, b in rendered.supervised))
    old = encode(before, tok, tok.convert_tokens_to_ids(IMAGE), 1, 10**6, "s")
    assert old.input_ids == enc.input_ids
    changed = [p for p, (a, b) in enumerate(zip(old.labels, enc.labels)) if a != b]
    pieces = tok.convert_ids_to_tokens(enc.input_ids)
    assert all(pieces[p] == "▁" and old.labels[p] == IGNORE_INDEX for p in changed)
    answers = [t for r, t in turns if r == "assistant"]
    lone = [a for a in answers if not a[0].isalpha() or not a[0].isascii()]
    assert len(changed) == len(lone)


@pytest.mark.parametrize("caption", ["a red circle", "3 lesions in the left lung", "左肺", "\nnormal"])
def test_plain_captions_equal_the_official_code(llama_like, caption):
    tok = llama_like
    want_ids, want_labels = official_plain(caption, tok)
    _, enc = ours([("user", IMAGE), ("assistant", caption)], tok, "plain")
    assert enc.input_ids == want_ids and enc.labels == want_labels
    assert tok.convert_ids_to_tokens(enc.input_ids[2:3])[0].startswith("▁")  # the caption's dummy prefix


def test_image_tokens_are_followed_by_the_official_dummy_prefix(llama_like):
    """The measurement behind the choice: after `<image>` the official chunking gives "▁" then the
    newline in both flavours; one tokenizer call on the whole text (llava-hf's processor) gives it
    only with a legacy tokenizer. Training and inference use the official sequence."""
    tok = llama_like
    text = "USER: <image>\nWhat is 5?"
    image = tok.convert_tokens_to_ids(IMAGE)
    chunked = tok.convert_ids_to_tokens(tokenize(text, tok, image, image_chunks=True)[0])
    whole = tok.convert_ids_to_tokens(tokenize(text, tok, image, image_chunks=False)[0])
    at = chunked.index(IMAGE)
    assert chunked[at : at + 3] == [IMAGE, "▁", "<0x0A>"]
    assert whole[at : at + 3] == ([IMAGE, "▁", "<0x0A>"] if tok.legacy else [IMAGE, "<0x0A>", whole[at + 2]])
    assert chunked == tok.convert_ids_to_tokens(official_ids(text, tok, True)[1:])
    # The chunked offsets still point at the text: the dummy "▁" at the newline it precedes.
    ids, offsets = tokenize(text, tok, image, image_chunks=True)
    assert [text[a:b] for a, b in offsets[at : at + 3]] == [IMAGE, "\n", "\n"]


def test_chat_template_mode_keeps_the_processors_one_call_tokenisation(llama_like):
    from lora_llava.model.processor import LLAVA_HF_CHAT_TEMPLATE

    tok = llama_like
    tok.chat_template = LLAVA_HF_CHAT_TEMPLATE
    rendered, enc = ours(SINGLE["digit"], tok, "chat_template")
    assert not rendered.image_chunks
    assert enc.input_ids[1:] == tok(rendered.text, add_special_tokens=False).input_ids
    first = next(p for p, lab in enumerate(enc.labels) if lab != IGNORE_INDEX)
    assert tok.convert_ids_to_tokens(enc.input_ids[first : first + 2]) == ["▁", "3"]


def _release_processor(tok):
    from lora_llava.merging.release import text_after_image, vicuna_chat_template
    from lora_llava.model.processor import build_processor

    return build_processor(tok, 56, 14, chat_template=vicuna_chat_template(None, tok.eos_token, text_after_image(tok)))


def _tiny_tokenizer():
    from lora_llava.model.tiny import build_tokenizer

    return build_tokenizer()


@pytest.mark.parametrize("flavour", ["non-legacy", "legacy", "tiny"])
def test_released_chat_template_and_processor_give_the_training_ids(flavour):
    """A plain transformers user (chat template, then the processor on the whole text) gets training's ids."""
    tok = _tiny_tokenizer() if flavour == "tiny" else llama_like_tokenizer(legacy=flavour == "legacy")
    processor = _release_processor(tok)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    turns = [("user", "<image>\nHow many lesions?"), ("assistant", "2"), ("user", "Which side?"), ("assistant", "左肺")]
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many lesions?"}]},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "Which side?"},
        {"role": "assistant", "content": [{"type": "text", "text": "左肺"}]},
    ]
    image_id = tok.convert_tokens_to_ids(IMAGE)
    train = encode(render(Sample("s", tuple(turns), ("a.png",)), "vicuna_v1", tok), tok, image_id, 16, 10**6, "s")
    for content in (messages, [{"role": "user", "content": turns[0][1]}, *messages[1:]]):  # typed or string content
        text = processor.apply_chat_template(content)
        assert processor(images=image, text=text, return_tensors="pt")["input_ids"][0].tolist() == train.input_ids
    prompt = processor.apply_chat_template(messages[:3], add_generation_prompt=True)
    prompt_ids = processor(images=image, text=prompt, return_tensors="pt")["input_ids"][0].tolist()
    assert train.input_ids[: len(prompt_ids)] == prompt_ids
    assert train.labels[len(prompt_ids) - 1] == IGNORE_INDEX and train.labels[len(prompt_ids)] != IGNORE_INDEX
    if flavour != "tiny":  # the tiny tokenizer has no CJK pieces
        assert tok.convert_ids_to_tokens(train.input_ids[len(prompt_ids)]) == "▁"


@pytest.mark.parametrize("flavour", ["non-legacy", "legacy", "tiny"])
def test_predict_prompt_is_the_training_prefix_up_to_the_trained_space(flavour):
    from lora_llava.evaluate.generate import Predictor, Request

    tok = _tiny_tokenizer() if flavour == "tiny" else llama_like_tokenizer(legacy=flavour == "legacy")
    predictor = Predictor(SimpleNamespace(eval=lambda: None), _release_processor(tok), "vicuna_v1")
    image = Image.new("RGB", (40, 30))
    for answer in ("3", "Yes", "左肺", "\nnone"):
        turns = [("user", "<image>\nHow many lesions?"), ("assistant", answer)]
        prompt = predictor.prompt_ids(Request((turns[0],), (image,)))
        image_id = tok.convert_tokens_to_ids(IMAGE)
        train = encode(render(Sample("s", tuple(turns), ("a.png",)), "vicuna_v1", tok), tok, image_id, 16, 10**6, "s")
        assert train.input_ids[: len(prompt)] == prompt
        assert train.labels[len(prompt) - 1] == IGNORE_INDEX and train.labels[len(prompt)] != IGNORE_INDEX
