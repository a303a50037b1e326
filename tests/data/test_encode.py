"""Tokens and labels: exactly the answers (+ EOS) are supervised; max_length never cuts image tokens."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lora_llava.data.dataset import LlavaDataset, collate
from lora_llava.data.encode import IGNORE_INDEX, encode
from lora_llava.data.formats import TOO_LONG, Sample, SampleError
from lora_llava.data.templates import render
from lora_llava.recipe.schema import DatasetSpec

TPI = 16  # image tokens per image of the tiny model (56 px, 14 px patches)
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


def _encode(sample: Sample, processor, template: str = "vicuna_v1", max_length: int = 4096):
    tok = processor.tokenizer
    image_id = tok.convert_tokens_to_ids("<image>")
    return encode(render(sample, template, tok), tok, image_id, TPI, max_length, sample.id)


def _supervised(enc, tok) -> str:
    return tok.decode([t for t in enc.labels if t != IGNORE_INDEX])


def _masked(enc, tok) -> str:
    return tok.decode([t for t, lab in zip(enc.input_ids, enc.labels) if lab == IGNORE_INDEX])


@pytest.mark.parametrize(
    "turns, images, supervised",
    [
        ((("user", "<image>\nWhat colour is the shape?"), ("assistant", "red")), ("a.png",), "red</s>"),
        (
            (("user", "<image>\nWhat colour?"), ("assistant", "red"), ("user", "Is it a star?"), ("assistant", "no")),
            ("a.png",),
            "red</s> no</s>",
        ),
        ((("user", "What is a lung?"), ("assistant", "an organ")), (), "an organ</s>"),
    ],
    ids=["single-turn", "multi-turn", "text-only"],
)
def test_only_answers_and_their_eos_are_supervised(tiny_processor, turns, images, supervised):
    tok = tiny_processor.tokenizer
    enc = _encode(Sample("s", turns, images), tiny_processor)
    assert _supervised(enc, tok) == supervised
    assert enc.input_ids[0] == tok.bos_token_id and enc.labels[0] == IGNORE_INDEX
    assert enc.input_ids.count(tok.convert_tokens_to_ids("<image>")) == TPI * len(images)
    masked = _masked(enc, tok)
    assert masked.startswith("<s> " + SYSTEM + " USER:")
    assert "ASSISTANT:" in masked and "</s>" not in masked
    assert all(lab == IGNORE_INDEX for t, lab in zip(enc.input_ids, enc.labels) if t == tok.convert_tokens_to_ids("<image>"))


def test_plain_supervises_caption_and_newline(tiny_processor):
    tok = tiny_processor.tokenizer
    enc = _encode(Sample("c", (("user", "<image>"), ("assistant", "a red circle")), ("a.png",)), tiny_processor, "plain")
    assert enc.input_ids[: 1 + TPI] == [tok.bos_token_id] + [tok.convert_tokens_to_ids("<image>")] * TPI
    assert _supervised(enc, tok).strip() == "a red circle"
    assert tok.convert_ids_to_tokens([t for t in enc.labels if t != IGNORE_INDEX])[-1].endswith("\n")
    assert tok.eos_token_id not in enc.input_ids


def test_a_long_question_is_cut_in_its_middle_and_the_answer_kept(tiny_processor):
    tok = tiny_processor.tokenizer
    question = "What is shown on the left? " + "red green blue " * 40 + "Is it a circle?"
    full = _encode(Sample("q", (("user", "<image>\n" + question), ("assistant", "yes")), ("a.png",)), tiny_processor)
    enc = _encode(
        Sample("q", (("user", "<image>\n" + question), ("assistant", "yes")), ("a.png",)), tiny_processor, max_length=90
    )
    assert len(full.input_ids) > 90 and len(enc.input_ids) == 90 and enc.truncated
    assert _supervised(enc, tok) == "yes</s>"
    text = tok.decode(enc.input_ids)
    assert "What is shown" in text and "circle?" in text and "ASSISTANT:" in text


def test_later_rounds_are_dropped_whole(tiny_processor):
    tok = tiny_processor.tokenizer
    turns = (("user", "<image>\nWhat colour?"), ("assistant", "red"), ("user", "Is it a star? " * 10), ("assistant", "no"))
    enc = _encode(Sample("r", turns, ("a.png",)), tiny_processor, max_length=70)
    assert _supervised(enc, tok) == "red</s>" and enc.images == 1
    assert tok.decode(enc.input_ids).endswith("ASSISTANT: red</s>")


def test_a_sample_whose_images_cannot_fit_is_a_data_error(tiny_processor):
    sample = Sample("big", (("user", "<image>\n<image>\n<image>\nSame?"), ("assistant", "yes")), ("a", "b", "c"))
    with pytest.raises(SampleError) as e:
        _encode(sample, tiny_processor, max_length=60)
    assert e.value.kind == TOO_LONG and e.value.sample_id == "big"


@pytest.fixture(scope="module")
def sweep_data(tmp_path_factory):
    """Samples that stress truncation: long question, images in two rounds, text-only, a long answer."""
    root = tmp_path_factory.mktemp("sweep")
    for name, size in (("wide.png", (70, 30)), ("tall.png", (30, 70))):
        Image.new("RGB", size, (200, 30, 30)).save(root / name)
    long_q = "Is there a lesion " + "in the left lung " * 12 + "?"
    samples = [
        {
            "id": "long-question",
            "image": "wide.png",
            "conversations": [{"from": "human", "value": long_q + " <image>"}, {"from": "gpt", "value": "yes"}],
        },
        {
            "id": "two-images",
            "image": ["wide.png", "tall.png"],
            "conversations": [
                {"from": "human", "value": "<image>\nWhat colour is it?"},
                {"from": "gpt", "value": "red"},
                {"from": "human", "value": "And here? <image>"},
                {"from": "gpt", "value": "red as well " * 5},
            ],
        },
        {
            "id": "text-only",
            "conversations": [{"from": "human", "value": "What is a CT scan?"}, {"from": "gpt", "value": "an x-ray image " * 8}],
        },
        {
            "id": "long-answer",
            "image": "tall.png",
            "conversations": [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "a red square " * 20}],
        },
    ]
    (root / "data.json").write_text(json.dumps(samples), encoding="utf-8")
    return root


def test_no_max_length_ever_gives_an_image_token_feature_mismatch(tiny_model, tiny_processor, sweep_data):
    """Every sample at every max_length either fits (whole images, an answer token) or is a clean 'too long'."""
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_model).eval()
    image_id = tiny_processor.tokenizer.convert_tokens_to_ids("<image>")
    spec = DatasetSpec(path=str(sweep_data / "data.json"))
    fitted, too_long, images_kept = 0, 0, set()
    for max_length in range(1, 200, 3):
        ds = LlavaDataset((spec,), tiny_processor, "vicuna_v1", max_length)
        batch = []
        for j in range(len(ds)):
            s = ds.sample(j)
            try:
                enc, pixels = ds.encode_sample(s)
            except SampleError as e:
                assert e.kind == TOO_LONG
                too_long += 1
                continue
            n_images = 0 if pixels is None else pixels["pixel_values"].shape[0]
            assert len(enc.input_ids) <= max_length
            assert enc.input_ids.count(image_id) == TPI * n_images == TPI * enc.images
            assert any(lab != IGNORE_INDEX for lab in enc.labels)
            if s.id == "two-images":
                images_kept.add(enc.images)
            batch.append({"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), **(pixels or {})})
        if batch:
            with torch.no_grad():
                out = model(**collate(batch, tiny_processor.tokenizer.pad_token_id))
            assert torch.isfinite(out.loss)
            fitted += len(batch)
    assert fitted > 100 and too_long > 50  # both paths were exercised
    assert images_kept == {1, 2}  # the second image goes with its round, and its pixels with it
