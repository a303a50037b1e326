"""`lora-llava chat`: a multi-turn conversation in the run's template, driven by scripted input."""

from __future__ import annotations

import pytest

from lora_llava.errors import DataError
from lora_llava.evaluate.generate import ChatSession, Sampling, load_predictor
from tests.helpers import run_cli

SAMPLING = Sampling(max_new_tokens=5)


@pytest.fixture(scope="module")
def predictor(lora_run):
    return load_predictor(lora_run)


def _image(shapes, i):
    return shapes / "images" / f"test_{i:05d}.png"


def test_history_is_kept_in_the_template(predictor, shapes, monkeypatch):
    session = ChatSession(predictor, _image(shapes, 0), SAMPLING)
    first = session.ask("What colour is the shape?")
    prompts = []
    real = predictor.generate
    monkeypatch.setattr(predictor, "generate", lambda requests, *a, **k: prompts.extend(requests) or real(requests, *a, **k))
    second = session.ask("And what shape is it?")
    (request,) = prompts
    assert request.turns == (
        ("user", "<image>\nWhat colour is the shape?"),
        ("assistant", first),
        ("user", "And what shape is it?"),
    )
    assert len(request.images) == 1  # the image stays with the conversation
    text = predictor.processor.tokenizer.decode(predictor.prompt_ids(request))
    assert f"ASSISTANT: {first}</s>USER: And what shape is it? ASSISTANT:" in text.replace("<image>", "")
    assert session.turns[-1] == ("assistant", second)
    session.reset()
    assert session.turns == [] and session.image is not None


def test_scripted_session_through_the_cli(predictor, lora_run, shapes):
    """Questions, a follow-up, /image, a bad /image, /reset, an unknown command, /quit; answers equal the library's."""
    script = "\n".join(
        [
            "What colour is the shape?",
            "And the shape?",
            f"/image {_image(shapes, 1)}",
            "Is there a circle?",
            "/image /no/such/image.png",
            "What colour is it?",
            "/reset",
            "/bogus",
            "Describe it.",
            "/quit",
            "this line is never answered",
        ]
    )
    result = run_cli(
        "chat", "--model", str(lora_run), "--image", str(_image(shapes, 0)), "--max-new-tokens", "5", input=script + "\n"
    )
    assert result.returncode == 0, result.stderr[-2000:]

    session = ChatSession(predictor, _image(shapes, 0), SAMPLING)
    expected = [session.ask("What colour is the shape?"), session.ask("And the shape?")]
    session.load_image(_image(shapes, 1))
    expected.append(session.ask("Is there a circle?"))
    expected.append(session.ask("What colour is it?"))  # the failed /image kept image 1 and the conversation
    session.reset()
    expected.append(session.ask("Describe it."))
    assert result.stdout == "".join(answer + "\n" for answer in expected)
    assert f"(image {_image(shapes, 1)}: new conversation)" in result.stderr
    assert "error: /no/such/image.png: image not found" in result.stderr
    assert "(new conversation)" in result.stderr and "unknown command /bogus" in result.stderr
    assert "Traceback" not in result.stderr


def test_text_only_chat_and_end_of_input(predictor, lora_run):
    result = run_cli("chat", "--model", str(lora_run), "--max-new-tokens", "3", input="Hello there\n\nHow are you?")
    assert result.returncode == 0, result.stderr[-2000:]
    session = ChatSession(predictor, None, Sampling(max_new_tokens=3))
    expected = [session.ask("Hello there"), session.ask("How are you?")]  # the blank line is skipped
    assert result.stdout == "".join(answer + "\n" for answer in expected)  # the end of input ends the session


def test_a_follow_up_may_not_add_an_image_tag(predictor, shapes):
    session = ChatSession(predictor, _image(shapes, 0), SAMPLING)
    session.ask("What colour is the shape?")
    with pytest.raises(DataError, match="2 <image> tag"):
        session.ask("<image> and this one?")
    assert len(session.turns) == 2  # a refused question leaves the history as it was
