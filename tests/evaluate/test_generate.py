"""`lora-llava predict`: prompts built as training builds them, left-padded batches, run / merged / plain folders."""

from __future__ import annotations

import json

import pytest
import torch

from lora_llava.data.templates import VICUNA_SYSTEM
from lora_llava.errors import DataError, LoraLlavaError
from lora_llava.evaluate.generate import Request, Sampling, load_predictor, user_text
from tests.helpers import run_cli

GREEDY = Sampling(max_new_tokens=6)


@pytest.fixture(scope="module")
def run_predictor(lora_run):
    return load_predictor(lora_run)


def _image(shapes, i=0):
    return shapes / "images" / f"test_{i:05d}.png"


def test_run_folder_is_rebuilt_as_trained(run_predictor, lora_run, tiny_model):
    from peft import PeftModel

    p = run_predictor
    assert isinstance(p.model, PeftModel) and p.template == "vicuna_v1" and p.image_aspect == "pad"
    assert p.tokens_per_image == 16
    assert not p.model.training
    assert p.model.get_base_model().lm_head.weight.dtype == torch.float32  # the recipe's dtype


def test_qlora_run_loads_4bit_as_trained(qlora_run, shapes):
    from lora_llava.model.load import quantized_module_names

    p = load_predictor(qlora_run)
    assert quantized_module_names(p.model)  # NF4, as in training: PEFT reproduces the model only on the same base
    assert p.model.get_base_model().lm_head.weight.dtype == torch.bfloat16
    assert isinstance(p.predict([_image(shapes)], "What colour is the shape?", GREEDY), str)


def test_prompt_is_the_training_prefix(run_predictor, lora_run):
    """The generation prompt's ids are exactly the ids training saw before the answer."""
    from lora_llava.data.build import build_dataset
    from lora_llava.recipe.parse import load_recipe

    recipe = load_recipe(lora_run / "recipe.yaml")
    ds = build_dataset(recipe, run_predictor.processor)
    sample = ds.sample(0)
    enc, _ = ds.encode_sample(sample)
    prompt = run_predictor.prompt_ids(Request(sample.turns[:1], (object(),)))
    assert enc.input_ids[: len(prompt)] == prompt
    first_answer = next(i for i, label in enumerate(enc.labels) if label != -100)
    assert first_answer == len(prompt)  # the answer starts right where generation starts
    tok = run_predictor.processor.tokenizer
    assert prompt[0] == tok.bos_token_id and prompt.count(run_predictor.image_token_id) == 16
    text = tok.decode([t for t in prompt if t != run_predictor.image_token_id])
    assert text.startswith(f"<s> {VICUNA_SYSTEM} USER: ") or text.startswith(f"<s>{VICUNA_SYSTEM} USER: ")
    assert text.endswith("ASSISTANT:")


def test_batches_are_left_padded_with_pad_to_square_pixels(run_predictor, shapes, monkeypatch):
    from lora_llava.data.images import open_image, pixel_values

    p = run_predictor
    seen = {}
    real = p.model.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return real(**kwargs)

    monkeypatch.setattr(p.model, "generate", spy)
    images = [open_image(_image(shapes, i)) for i in range(2)]
    requests = [
        Request((("user", "<image>\nWhat colour is the shape?"),), (images[0],)),
        Request((("user", "<image>\nIs there a circle in this picture, or is there not?"),), (images[1],)),
    ]
    p.generate(requests, GREEDY, batch_size=2)
    ids, mask = seen["input_ids"], seen["attention_mask"]
    lengths = [len(p.prompt_ids(r)) for r in requests]
    assert ids.shape[1] == max(lengths) and lengths[0] < lengths[1]
    short = 0 if lengths[0] < lengths[1] else 1
    pad = ids.shape[1] - min(lengths)
    assert mask[short, :pad].sum() == 0 and mask[short, pad:].all()  # padding on the left
    assert (ids[short, :pad] == p.processor.tokenizer.pad_token_id).all()
    assert not seen["do_sample"] and seen["eos_token_id"] == p.processor.tokenizer.eos_token_id
    # sorted by length, the batch holds the images in prompt order
    order = sorted(range(2), key=lambda i: lengths[i])
    expected = pixel_values([images[i] for i in order], p.processor.image_processor, "pad")
    assert torch.equal(seen["pixel_values"], expected)


def test_batched_answers_equal_one_by_one(run_predictor, shapes):
    from lora_llava.data.images import open_image

    questions = ["What colour is the shape?", "Is there a square?", "What shape is shown in this small image?"]
    requests = [Request((("user", f"<image>\n{q}"),), (open_image(_image(shapes, i)),)) for i, q in enumerate(questions)]
    batched = run_predictor.generate(requests, GREEDY, batch_size=3)
    alone = [run_predictor.generate([r], GREEDY)[0] for r in requests]
    assert batched == alone
    assert all(batched)


def test_sampling_settings_are_checked_and_seeded(run_predictor, shapes):
    with pytest.raises(LoraLlavaError, match="max_new_tokens"):
        Sampling(max_new_tokens=0)
    with pytest.raises(LoraLlavaError, match="top_p"):
        Sampling(top_p=0)
    hot = Sampling(max_new_tokens=6, temperature=1.5, top_p=0.9, seed=3)
    one = run_predictor.predict([_image(shapes)], "What colour is the shape?", hot)
    assert one == run_predictor.predict([_image(shapes)], "What colour is the shape?", hot)


def test_image_tags(shapes):
    assert user_text("What is it?", 1) == "<image>\nWhat is it?"
    assert user_text("Compare.", 2) == "<image>\n<image>\nCompare."
    assert user_text("Left <image> right <image>", 2) == "Left <image> right <image>"
    with pytest.raises(DataError, match="1 <image> tag"):
        user_text("<image> what?", 2)


def test_plain_model_folder_uses_vicuna_unless_told(tiny_model):
    p = load_predictor(tiny_model)
    assert p.template == "vicuna_v1" and type(p.model).__name__ == "LlavaForConditionalGeneration"
    own = load_predictor(tiny_model, template="chat_template")
    text = own.processor.tokenizer.decode(own.prompt_ids(Request((("user", "hi"),))))
    assert "USER: hi ASSISTANT:" in text and VICUNA_SYSTEM not in text
    with pytest.raises(LoraLlavaError, match="--template"):
        load_predictor(tiny_model, template="llama3")


def test_predict_cli_prints_the_answer_last(lora_run, shapes, run_predictor):
    args = ("predict", "--model", str(lora_run), "--image", str(_image(shapes)), "--prompt", "What colour is the shape?")
    result = run_cli(*args, "--max-new-tokens", "6")
    assert result.returncode == 0, result.stderr[-2000:]
    expected = run_predictor.predict([_image(shapes)], "What colour is the shape?", GREEDY)
    assert result.stdout.rstrip("\n").endswith(expected) and expected


def test_predict_cli_batch_mode_writes_one_line_per_question(lora_run, shapes, tmp_path, run_predictor):
    out = tmp_path / "preds.jsonl"
    args = ("predict", "--model", str(lora_run), "--data", str(shapes / "test.json"), "--image-folder", str(shapes / "images"))
    result = run_cli(*args, "--output", str(out), "--limit", "4", "--max-new-tokens", "6", "--batch-size", "3")
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    samples = json.loads((shapes / "test.json").read_text())[:4]
    assert [r["id"] for r in rows] == [s["id"] for s in samples]
    assert [r["reference"] for r in rows] == [s["answer"] for s in samples]
    assert rows[0]["question"] == "What colour is the shape?"
    assert rows[0]["answer"] == run_predictor.predict([_image(shapes)], "What colour is the shape?", GREEDY)
    before = out.read_bytes()
    again = run_cli(*args, "--output", str(out))
    assert again.returncode == 2 and "exists (use --overwrite" in again.stderr and "Traceback" not in again.stderr
    assert out.read_bytes() == before


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model", "--prompt", "hi"], "--model: model folder /no/such/model not found"),
        (["--prompt", "hi"], "--model: required"),
        (["--model", "MODEL", "--image", "/no/such.png", "--prompt", "hi"], "/no/such.png: image not found"),
        (["--model", "MODEL", "--data", "DATA"], "--output: required with --data"),
    ],
)
def test_predict_cli_user_errors_are_one_line(tiny_model, shapes, args, message):
    args = [a.replace("MODEL", str(tiny_model)).replace("DATA", str(shapes / "test.json")) for a in args]
    result = run_cli("predict", *args)
    assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def test_merged_folder_answers_like_the_run(lora_run, shapes, tmp_path, run_predictor):
    """Greedy answers from base + adapter and from the merged checkpoint are the same."""
    from lora_llava.merging.run import merge

    merged = tmp_path / "merged"
    merge(lora_run, merged)
    p = load_predictor(merged)
    assert type(p.model).__name__ == "LlavaForConditionalGeneration" and p.template == "vicuna_v1"
    prompts = ["What colour is the shape?", "Is there a circle?", "What shape is shown?"]
    for i, prompt in enumerate(prompts):
        image = [_image(shapes, i)]
        assert p.predict(image, prompt, Sampling(max_new_tokens=8)) == run_predictor.predict(
            image, prompt, Sampling(max_new_tokens=8)
        )
    cli = run_cli(
        "predict", "--model", str(merged), "--image", str(_image(shapes)), "--prompt", prompts[0], "--max-new-tokens", "8"
    )
    assert cli.returncode == 0 and cli.stdout.rstrip("\n").endswith(
        run_predictor.predict([_image(shapes)], prompts[0], Sampling(8))
    )
