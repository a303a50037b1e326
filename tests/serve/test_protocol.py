"""The server's request parsing, image rules, streamed text and CLI errors, without a server."""

from __future__ import annotations

import base64
import io
import sys

import pytest
import torch
from PIL import Image

from lora_llava.serve.engine import RowStreamer, cut_at_stop, settled, to_request
from lora_llava.serve.protocol import ApiError, ImagePolicy, open_image_url, parse_chat


def _png(colour=(200, 10, 10), size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def test_turns_are_written_as_predict_writes_them():
    url = "data:image/png;base64," + base64.b64encode(_png()).decode()
    chat = parse_chat(
        {
            "messages": [
                {"role": "system", "content": [{"type": "text", "text": "Be brief."}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What "},
                        {"type": "image_url", "image_url": {"url": url}},
                        {"type": "text", "text": "is it?"},
                    ],
                },  # fmt: skip
                {"role": "assistant", "content": "A square."},
                {"role": "user", "content": "Sure?"},
            ],
            "stop": "END",
            "max_completion_tokens": 5,
        },
        ImagePolicy(),
    )
    request = to_request(chat)
    assert request.turns == (("user", "<image>\nWhat is it?"), ("assistant", "A square."), ("user", "Sure?"))
    assert request.system == "Be brief." and len(request.images) == 1 and request.images[0].size == (40, 30)
    assert (chat.stop, chat.max_tokens, chat.temperature, chat.top_p, chat.stream) == (("END",), 5, 0.0, 1.0, False)


def test_image_root_rules(tmp_path):
    root, outside = tmp_path / "root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "a.png").write_bytes(_png())
    (outside / "b.png").write_bytes(_png((0, 0, 200)))
    (root / "link.png").symlink_to(outside / "b.png")  # inside by name, outside in fact
    allowed = ImagePolicy(root=root)
    assert open_image_url("a.png", allowed, "p").getpixel((0, 0)) == (200, 10, 10)
    assert open_image_url(f"file://{root / 'a.png'}", allowed, "p").size == (40, 30)
    for ref in ("link.png", "../outside/b.png", str(outside / "b.png"), f"file://{outside / 'b.png'}"):
        with pytest.raises(ApiError) as e:
            open_image_url(ref, allowed, "p")
        assert e.value.status == 403 and e.value.code == "image_outside_root", ref
    with pytest.raises(ApiError) as e:
        open_image_url("a.png", ImagePolicy(), "p")  # no --image-root: no local files at all
    assert e.value.status == 403 and "--image-root" in e.value.message
    with pytest.raises(ApiError, match="--allow-remote-images"):
        open_image_url("http://127.0.0.1:9/x.png", allowed, "p")


def test_settled_text_holds_back_what_may_still_change():
    assert settled("the answer is ", ()) == "the answer is"
    assert settled("a red <ima", ()) == "a red "
    assert settled("half a character \ufffd", ()) == "half a character"
    assert settled("red. Obser", ("Observation",)) == "red. "
    assert settled("red. Obs", ("END",)) == "red. Obs"
    assert cut_at_stop("one END two STOP", ("STOP", "END")) == ("one ", True)
    assert cut_at_stop("one two", ("STOP",)) == ("one two", False)


class _Job:
    def __init__(self, stop=()):
        self.chat = type("Chat", (), {"stream": True, "stop": stop})()
        self.deltas: list[str] = []

    def emit(self, kind, value):
        assert kind == "delta"
        self.deltas.append(value)


@pytest.mark.parametrize("stop", [(), ("zone",)])
def test_streamed_deltas_join_to_the_final_answer(tiny_processor, stop):
    """Tokens in one at a time (byte-fallback characters, an image tag, trailing space): the deltas are the answer."""
    tok = tiny_processor.tokenizer
    ids = tok("  Größe 四 is <image> a red zone shape  ", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    job = _Job(stop)
    streamer = RowStreamer(tok, [job])
    streamer.put(torch.tensor([[1, 2, 3]]))  # the prompt comes first and is not part of the answer
    for token in ids:
        streamer.put(torch.tensor([token]))
    decoded = tok.decode(ids, skip_special_tokens=True).replace("<image>", "").strip()  # as generate_ids returns it
    final, stopped = cut_at_stop(decoded, stop)
    streamer.finish(0, final)
    assert "".join(job.deltas) == final and len(job.deltas) >= 3
    assert not any("<" in d for d in job.deltas) and streamer.ended == [True]
    assert len(streamer.tokens[0]) == len(ids) and stopped == bool(stop)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/no/such/model"], "--model: model folder /no/such/model not found"),
        (["--model", "MODEL", "--image-root", "/no/such/folder"], "--image-root: /no/such/folder is not a folder"),
        (["--image-root", "/tmp"], "--model: required"),
        (["--model", "MODEL", "--queue-size", "0"], "--queue-size: must be at least 1, got 0"),
    ],
)
def test_cli_user_errors_are_one_line(tiny_model, capsys, args, message):
    from lora_llava.cli import main

    code = main(["serve", *(a.replace("MODEL", str(tiny_model)) for a in args)])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == [next(line for line in err if message in line)] and err[0].startswith("lora-llava serve: error:")


def test_missing_extras_name_the_install_command(capsys, monkeypatch):
    from lora_llava.cli import main

    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    monkeypatch.delitem(sys.modules, "lora_llava.serve.app", raising=False)
    assert main(["serve", "--model", "whatever"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'lora-llava[serve]'" in err[0]
