"""Prompt templates, rendered to text plus the character spans that are supervised.

The exact strings (pinned by tests):

* `vicuna_v1` (LLaVA-1.5 stage 2), BOS first:
  `{system} USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`
  Generation prompt: `{system} USER: <image>\\n{q} ASSISTANT:`
* `plain` (LLaVA-1.5 stage 1), BOS first: `<image>{caption}\\n`; the human turn is dropped
  and, as in the reference, no `</s>` follows (only the caption and the newline are supervised).
* `mistral_instruct` (LLaVA-NeXT on Mistral-7B; the reference `conv_mistral_instruct`, LLAMA_2 separators
  with no system prompt), BOS first: `[INST] <image>\n{q1} [/INST] {a1} </s>[INST] {q2} [/INST] {a2} </s>`;
  a system prompt, when given, opens the first question as `<<SYS>>\n{system}\n<</SYS>>\n\n`.
  Generation prompt: `[INST] <image>\n{q} [/INST]`.
* `chatml_direct` (LLaVA-NeXT-34B; the reference `conv_chatml_direct`, MPT separators), BOS first:
  `<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\n{q1}<|im_end|>`
  `<|im_start|>assistant\n{a1}<|im_end|>...`; generation prompt ends `<|im_start|>assistant\n`, and
  `<|im_end|>` ends each answer (and generation) in place of the tokenizer's EOS.
* `chat_template`: the model's own Jinja template, rendered turn by turn; BOS is added when
  the template does not write it, and `</s>` after each answer when the template omits it
  (llava-hf's does, and a model trained without it never learns to stop). With llava-hf's
  template: `USER: <image>\\n{q1} ASSISTANT: {a1}</s>USER: {q2} ASSISTANT: {a2}</s>`.

Supervised spans are each answer plus its end-of-sequence token, starting at
the whitespace between the generation prompt and the answer (" " after
`ASSISTANT:`): the model writes it, and when the answer starts with a digit, a
CJK character or a newline a LLaMA tokenizer makes it a lone "▁" token, which
LLaVA's official code trains too. Everything else (BOS, system, user turns, role
markers, image tokens) is masked. The
system prompt is the sample's own system message if it has one, else
`data.system_prompt`, else the template's default.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import DataError
from .formats import IMAGE_TAG, MALFORMED, Sample, SampleError

VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
CHATML_SYSTEM = "Answer the questions."
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
TEMPLATES = ("vicuna_v1", "plain", "mistral_instruct", "chatml_direct", "chat_template")
# LLaVA's own templates are tokenised as its code does, one piece per `<image>`-separated chunk;
# `chat_template` follows the model's processor (one call on the whole text).
IMAGE_CHUNK_TEMPLATES = ("vicuna_v1", "plain", "mistral_instruct", "chatml_direct")


def stop_token(template: str, tokenizer) -> str:
    """The token that ends an answer under `template` (training supervises it; generation stops at it)."""
    return IM_END if template == "chatml_direct" else tokenizer.eos_token


@dataclass(frozen=True)
class Rendered:
    text: str
    supervised: tuple[tuple[int, int], ...]  # [start, end) character spans of answers (+ EOS)
    round_ends: tuple[int, ...]  # character offset where each user/assistant round ends
    questions: tuple[tuple[int, int], ...] = ()  # [start, end) spans of user text, which truncation may shorten
    image_chunks: bool = False  # tokenise the text between `<image>` tags piece by piece, as LLaVA's own code does


def render(sample: Sample, template: str, tokenizer, system_prompt: str | None = None) -> Rendered:
    """The training text of a sample under `template`, with its supervised spans."""
    if template == "vicuna_v1":
        rendered = _render_vicuna(sample.turns, sample.system or system_prompt or VICUNA_SYSTEM, tokenizer.eos_token)
        return dataclasses.replace(rendered, image_chunks=True)
    if template == "plain":
        if len(sample.turns) != 2:
            raise SampleError(
                sample.id, MALFORMED, f"the plain template takes one caption per sample, got {len(sample.turns) // 2} rounds"
            )
        return dataclasses.replace(_render_plain(sample.turns), image_chunks=True)
    if template == "mistral_instruct":
        return dataclasses.replace(_render_mistral(sample.turns, sample.system or system_prompt, tokenizer.eos_token), image_chunks=True)
    if template == "chatml_direct":
        return dataclasses.replace(_render_chatml(sample.turns, sample.system or system_prompt or CHATML_SYSTEM), image_chunks=True)
    if template == "chat_template":
        return _render_chat_template(sample.turns, sample.system or system_prompt, tokenizer)
    raise ValueError(f"unknown template {template!r}")


def generation_prompt(turns: list[tuple[str, str]], template: str, tokenizer, system_prompt: str | None = None) -> str:
    """The prompt text for answering the last user turn of `turns` (earlier rounds answered)."""
    if template == "vicuna_v1":
        done = _render_vicuna(tuple(turns[:-1]), system_prompt or VICUNA_SYSTEM, tokenizer.eos_token).text
        if not done:
            done = (system_prompt or VICUNA_SYSTEM) + " "
        return f"{done}USER: {turns[-1][1]} ASSISTANT:"
    if template == "plain":
        return IMAGE_TAG * turns[-1][1].count(IMAGE_TAG)
    if template == "mistral_instruct":
        done = _render_mistral(tuple(turns[:-1]), system_prompt, tokenizer.eos_token).text
        return done + _mistral_question(turns[-1][1], system_prompt if not done else None)
    if template == "chatml_direct":
        system = system_prompt or CHATML_SYSTEM
        done = _render_chatml(tuple(turns[:-1]), system).text or f"{IM_START}system\n{system}{IM_END}"
        return f"{done}{IM_START}user\n{turns[-1][1]}{IM_END}{IM_START}assistant\n"
    messages = _messages(turns, system_prompt)
    return _apply(tokenizer, messages, add_generation_prompt=True)


def _render_vicuna(turns: tuple[tuple[str, str], ...], system: str, eos: str) -> Rendered:
    if not turns:
        return Rendered("", (), ())
    text = system + " "
    spans, ends, questions = [], [], []
    for k in range(0, len(turns), 2):
        text += "USER: "
        questions.append((len(text), len(text) + len(turns[k][1])))
        text += f"{turns[k][1]} ASSISTANT:"
        start = len(text)  # the space below is the model's first output after the generation prompt
        text += " "
        text += turns[k + 1][1] + eos
        spans.append((start, len(text)))
        ends.append(len(text))
    return Rendered(text, tuple(spans), tuple(ends), tuple(questions))


def _mistral_question(question: str, system: str | None) -> str:
    wrapped = f"<<SYS>>\n{system}\n<</SYS>>\n\n{question}" if system else question
    return f"[INST] {wrapped} [/INST]"


def _render_mistral(turns: tuple[tuple[str, str], ...], system: str | None, eos: str) -> Rendered:
    """The reference LLAMA_2 separators: `[INST] q [/INST]`, then ` a </s>` (a space either side of the answer)."""
    text, spans, ends, questions = "", [], [], []
    for k in range(0, len(turns), 2):
        prompt = _mistral_question(turns[k][1], system if k == 0 else None)
        at = len(text) + prompt.index(turns[k][1]) if turns[k][1] else len(text)
        questions.append((at, at + len(turns[k][1])))
        text += prompt
        start = len(text)
        text += f" {turns[k + 1][1]} {eos}"
        spans.append((start, len(text)))
        ends.append(len(text))
    return Rendered(text, tuple(spans), tuple(ends), tuple(questions))


def _render_chatml(turns: tuple[tuple[str, str], ...], system: str) -> Rendered:
    """The reference MPT separators with ChatML roles, no newline between turns: answers end with `<|im_end|>`."""
    if not turns:
        return Rendered("", (), ())
    text = f"{IM_START}system\n{system}{IM_END}"
    spans, ends, questions = [], [], []
    for k in range(0, len(turns), 2):
        text += f"{IM_START}user\n"
        questions.append((len(text), len(text) + len(turns[k][1])))
        text += f"{turns[k][1]}{IM_END}{IM_START}assistant\n"
        start = len(text)
        text += turns[k + 1][1] + IM_END
        spans.append((start, len(text)))
        ends.append(len(text))
    return Rendered(text, tuple(spans), tuple(ends), tuple(questions))


def _render_plain(turns: tuple[tuple[str, str], ...]) -> Rendered:
    # LLaVA's preprocess_plain replaces the human turn by the image token alone.
    prefix = IMAGE_TAG * turns[0][1].count(IMAGE_TAG)
    caption = turns[1][1]
    text = prefix + caption + "\n"
    return Rendered(text, ((len(prefix), len(text)),), (len(text),))


def _messages(turns, system: str | None) -> list[dict]:
    msgs = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return msgs + [{"role": r, "content": [{"type": "text", "text": t}]} for r, t in turns]


def _apply(tokenizer, messages: list[dict], add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_chat_template(turns: tuple[tuple[str, str], ...], system: str | None, tokenizer) -> Rendered:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError("data.template: chat_template, but this model's tokenizer has no chat template (use vicuna_v1)")
    eos = tokenizer.eos_token
    msgs = _messages(turns, system)
    offset = 1 if system else 0
    spans, ends, questions = [], [], []
    rendered_so_far = _apply(tokenizer, msgs[:offset], add_generation_prompt=False)
    text = rendered_so_far
    for k in range(0, len(turns), 2):
        with_prompt = _apply(tokenizer, msgs[: offset + k + 1], add_generation_prompt=True)
        with_answer = _apply(tokenizer, msgs[: offset + k + 2], add_generation_prompt=False)
        if not with_prompt.startswith(rendered_so_far) or not with_answer.startswith(with_prompt):
            raise DataError(
                "data.template: chat_template, but the model's chat template does not render turn by turn (use vicuna_v1)"
            )
        prompt_part = with_prompt[len(rendered_so_far) :]
        at = prompt_part.find(turns[k][1]) if turns[k][1] else -1
        if at >= 0:
            questions.append((len(text) + at, len(text) + at + len(turns[k][1])))
        text += prompt_part
        answer_part = with_answer[len(with_prompt) :]
        lead = len(answer_part) - len(answer_part.lstrip())
        body = answer_part.strip()
        start = len(text)  # the lead whitespace follows the generation prompt: the model writes it
        text += answer_part[:lead]
        text += body
        # The template's own EOS (if any) stays inside the span; otherwise we add one.
        if not body.endswith(eos):
            text += eos
        spans.append((start, len(text)))
        ends.append(len(text))
        rendered_so_far = with_answer
    return Rendered(text, tuple(spans), tuple(ends), tuple(questions))
