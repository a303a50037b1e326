"""Prompt templates: the exact strings LLaVA-1.5 trains on, and which characters are supervised."""

from __future__ import annotations

import pytest

from lora_llava.data.formats import Sample, SampleError
from lora_llava.data.templates import VICUNA_SYSTEM, generation_prompt, render

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
TWO_ROUNDS = Sample(
    "s1",
    (("user", "<image>\nWhat colour is the shape?"), ("assistant", "red"), ("user", "Is there a star?"), ("assistant", "no")),
    ("a.png",),
)


def supervised_text(rendered) -> list[str]:
    return [rendered.text[a:b] for a, b in rendered.supervised]


def test_vicuna_v1_string_is_llava_15s(tiny_processor):
    r = render(TWO_ROUNDS, "vicuna_v1", tiny_processor.tokenizer)
    assert VICUNA_SYSTEM == SYSTEM
    assert (
        r.text == f"{SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT: red</s>USER: Is there a star? ASSISTANT: no</s>"
    )
    assert supervised_text(r) == [" red</s>", " no</s>"]  # the space after ASSISTANT: is the first output
    assert [r.text[a:b] for a, b in r.questions] == ["<image>\nWhat colour is the shape?", "Is there a star?"]
    assert r.round_ends == (r.text.index("red</s>") + len("red</s>"), len(r.text))


def test_vicuna_v1_generation_prompt(tiny_processor):
    tok = tiny_processor.tokenizer
    first = generation_prompt([("user", "<image>\nWhat colour is the shape?")], "vicuna_v1", tok)
    assert first == f"{SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT:"
    second = generation_prompt(list(TWO_ROUNDS.turns[:3]), "vicuna_v1", tok)
    assert second == f"{SYSTEM} USER: <image>\nWhat colour is the shape? ASSISTANT: red</s>USER: Is there a star? ASSISTANT:"


def test_plain_string_drops_the_question_and_has_no_eos(tiny_processor):
    caption = Sample("c1", (("user", "Describe the photo.\n<image>"), ("assistant", "a red circle")), ("a.png",))
    r = render(caption, "plain", tiny_processor.tokenizer)
    assert r.text == "<image>a red circle\n"
    assert supervised_text(r) == ["a red circle\n"]
    assert generation_prompt([("user", "<image>\nDescribe.")], "plain", tiny_processor.tokenizer) == "<image>"


def test_plain_refuses_multi_round_samples(tiny_processor):
    with pytest.raises(SampleError, match="one caption per sample"):
        render(TWO_ROUNDS, "plain", tiny_processor.tokenizer)


def test_chat_template_adds_the_eos_llava_hf_omits(tiny_processor):
    """llava-hf's template writes no `</s>` after answers; training adds it, or the model never learns to stop."""
    r = render(TWO_ROUNDS, "chat_template", tiny_processor.tokenizer)
    assert r.text == "USER: <image>\nWhat colour is the shape? ASSISTANT: red</s>USER: Is there a star? ASSISTANT: no</s>"
    assert supervised_text(r) == [" red</s>", " no</s>"]  # the space after ASSISTANT: is the first output
    prompt = generation_prompt([("user", "<image>\nWhat colour is the shape?")], "chat_template", tiny_processor.tokenizer)
    assert prompt == "USER: <image>\nWhat colour is the shape? ASSISTANT:"


def test_system_prompt_precedence(tiny_processor):
    """A sample's own system message wins; else data.system_prompt; else the template's default."""
    tok = tiny_processor.tokenizer
    plain = Sample("t", (("user", "Hi"), ("assistant", "Hello")), ())
    own = Sample("t", plain.turns, (), system="Be brief.")
    assert render(plain, "vicuna_v1", tok).text.startswith(SYSTEM + " USER: Hi")
    assert (
        render(plain, "vicuna_v1", tok, system_prompt="You read X-rays.").text == "You read X-rays. USER: Hi ASSISTANT: Hello</s>"
    )
    assert render(own, "vicuna_v1", tok, system_prompt="You read X-rays.").text == "Be brief. USER: Hi ASSISTANT: Hello</s>"


def test_mistral_instruct_string_is_the_reference_llama_2_layout(tiny_processor):
    """conv_mistral_instruct: no system prompt, `[INST] q [/INST]`, then ` a </s>`; rounds joined by nothing."""
    tok = tiny_processor.tokenizer
    r = render(TWO_ROUNDS, "mistral_instruct", tok)
    assert r.text == "[INST] <image>\nWhat colour is the shape? [/INST] red </s>[INST] Is there a star? [/INST] no </s>"
    assert supervised_text(r) == [" red </s>", " no </s>"]
    assert [r.text[a:b] for a, b in r.questions] == ["<image>\nWhat colour is the shape?", "Is there a star?"]
    assert r.image_chunks
    assert generation_prompt(list(TWO_ROUNDS.turns[:1]), "mistral_instruct", tok) == "[INST] <image>\nWhat colour is the shape? [/INST]"
    assert generation_prompt(list(TWO_ROUNDS.turns[:3]), "mistral_instruct", tok) == r.text[: r.text.index(" no </s>")]
    with_system = render(TWO_ROUNDS, "mistral_instruct", tok, system_prompt="Be brief.")
    assert with_system.text.startswith("[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\n<image>\nWhat colour is the shape? [/INST] red </s>")


def test_chatml_direct_string_is_the_reference_mpt_layout(tiny_processor):
    """conv_chatml_direct: ChatML roles, `<|im_end|>` after every turn, no newline between turns."""
    tok = tiny_processor.tokenizer
    r = render(TWO_ROUNDS, "chatml_direct", tok)
    assert r.text == (
        "<|im_start|>system\nAnswer the questions.<|im_end|>"
        "<|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|><|im_start|>assistant\nred<|im_end|>"
        "<|im_start|>user\nIs there a star?<|im_end|><|im_start|>assistant\nno<|im_end|>"
    )
    assert supervised_text(r) == ["red<|im_end|>", "no<|im_end|>"]
    prompt = generation_prompt(list(TWO_ROUNDS.turns[:1]), "chatml_direct", tok)
    assert prompt == "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat colour is the shape?<|im_end|><|im_start|>assistant\n"
    assert r.text.startswith(prompt)


@pytest.mark.parametrize(
    ("name", "template"),
    [
        ("llava-hf/llava-v1.6-mistral-7b-hf", "mistral_instruct"),
        ("llava-hf/llava-v1.6-34b-hf", "chatml_direct"),
        ("llava-hf/llava-v1.6-vicuna-13b-hf", "vicuna_v1"),
        ("llava-hf/llava-1.5-13b-hf", "vicuna_v1"),
    ],
)
def test_the_template_defaults_to_the_checkpoints(name, template):
    from lora_llava.recipe.schema import checkpoint_template

    assert checkpoint_template(name) == template


@pytest.mark.parametrize("template", ["mistral_instruct", "chatml_direct"])
def test_released_chat_templates_render_the_training_text(template, tiny_processor):
    from lora_llava.merging.release import chatml_chat_template, mistral_chat_template

    tok = tiny_processor.tokenizer
    jinja = mistral_chat_template(None, tok.eos_token) if template == "mistral_instruct" else chatml_chat_template(None)
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": "red"},
        {"role": "user", "content": "Is there a star?"},
        {"role": "assistant", "content": [{"type": "text", "text": "no"}]},
    ]
    text = tok.apply_chat_template(messages, chat_template=jinja, tokenize=False)
    assert text == render(TWO_ROUNDS, template, tok).text
    prompt = tok.apply_chat_template(messages[:3], chat_template=jinja, tokenize=False, add_generation_prompt=True)
    assert prompt == generation_prompt(list(TWO_ROUNDS.turns[:3]), template, tok)
