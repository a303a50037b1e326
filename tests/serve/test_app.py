"""`lora-llava serve`: a real uvicorn server on the tiny LoRA run, driven over loopback HTTP.

Answers are compared with the library's `predict` on the same image and
prompt (greedy), plain and streamed; bad requests get their 4xx with OpenAI's
error object and the server answers the next request. Batching and the full
queue use an engine whose generation waits on a gate the test opens, so what
is queued when is certain.
"""

from __future__ import annotations

import base64
import json
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from lora_llava.evaluate.generate import ChatSession, Request, Sampling, load_predictor, predict, user_text
from lora_llava.serve.app import ServeOptions, create_app
from lora_llava.serve.engine import Engine, load_engine
from tests.helpers import serving

pytestmark = pytest.mark.e2e
MAX = 8
NAME = "tiny-run"
QUESTIONS = ["What colour is the shape?", "Is there a circle in the image?", "What shape is shown?"]


def _image(shapes, i=0):
    return shapes / "images" / f"test_{i:05d}.png"


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def user(question: str, *urls: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": question}]}


def ask(question: str, url: str, **extra) -> dict:
    return {"model": NAME, "messages": [user(question, url)], "max_tokens": MAX, **extra}


def stream(client: httpx.Client, body: dict) -> list[dict]:
    """The data events of a streamed completion, checked to end with [DONE]."""
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        data = [line[len("data: ") :] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


def answer(client: httpx.Client, body: dict) -> str:
    r = client.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def streamed_text(chunks: list[dict]) -> str:
    return "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])


@pytest.fixture(scope="module")
def engine(lora_run):
    return load_engine(str(lora_run), max_tokens=MAX)


@pytest.fixture(scope="module")
def client(engine, shapes):
    app = create_app(engine, NAME, ServeOptions(image_root=shapes / "images"))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def expected(lora_predictor, shapes):
    """predict's greedy answer to each (image i, question i)."""
    return [predict(lora_predictor, [_image(shapes, i)], q, max_new_tokens=MAX) for i, q in enumerate(QUESTIONS)]


def test_answers_equal_predict(client, lora_predictor, shapes, expected):
    for i, question in enumerate(QUESTIONS):
        r = client.post("/v1/chat/completions", json=ask(question, data_url(_image(shapes, i))))
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["object"] == "chat.completion" and body["model"] == NAME and body["id"].startswith("chatcmpl-")
        choice = body["choices"][0]
        assert choice["message"] == {"role": "assistant", "content": expected[i]} and expected[i]
        prompt = lora_predictor.prompt_ids(Request((("user", user_text(question, 1)),), (object(),)))
        usage = body["usage"]
        assert usage["prompt_tokens"] == len(prompt) and 1 <= usage["completion_tokens"] <= MAX
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert choice["finish_reason"] == "stop" or usage["completion_tokens"] == MAX


def test_streamed_chunks_join_to_predicts_answer(client, shapes, expected):
    chunks = stream(client, ask(QUESTIONS[0], data_url(_image(shapes)), stream_options={"include_usage": True}))
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert streamed_text(chunks) == expected[0]
    reasons = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert set(reasons[:-1]) == {None} and reasons[-1] in ("stop", "length")
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] >= 1
    assert sum(bool(c["choices"] and c["choices"][0]["delta"].get("content")) for c in chunks) >= 2  # it streams


def test_conversation_and_system_prompt_as_the_library_builds_them(client, lora_predictor, shapes):
    url = data_url(_image(shapes, 1))
    session = ChatSession(lora_predictor, _image(shapes, 1), Sampling(MAX))
    first, second = session.ask(QUESTIONS[0]), session.ask("Are you sure?")
    history = [user(QUESTIONS[0], url)]
    assert answer(client, {"messages": history, "max_tokens": MAX}) == first
    history += [{"role": "assistant", "content": first}, {"role": "user", "content": "Are you sure?"}]
    assert answer(client, {"messages": history, "max_tokens": MAX}) == second
    system = "Answer in one word."
    request = Request((("user", user_text(QUESTIONS[0], 1)),), (session.image,), system)
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "system", "content": system}, user(QUESTIONS[0], url)]})
    assert r.json()["choices"][0]["message"]["content"] == lora_predictor.generate([request], Sampling(MAX))[0]
    assert (  # the system message is in the prompt
        r.json()["usage"]["prompt_tokens"]
        == len(lora_predictor.prompt_ids(request))
        != len(lora_predictor.prompt_ids(Request(request.turns, request.images)))
    )


def test_stop_strings_cut_the_answer_plain_and_streamed(client, shapes, expected):
    full = expected[2]
    stop = full[2:4]
    assert len(stop) == 2 and not full.startswith(stop)
    cut = full[: full.find(stop)]
    body = ask(QUESTIONS[2], data_url(_image(shapes, 2)), stop=[stop, "never-said"])
    choice = client.post("/v1/chat/completions", json=body).json()["choices"][0]
    assert choice["message"]["content"] == cut and choice["finish_reason"] == "stop"
    chunks = stream(client, body)
    assert streamed_text(chunks) == cut and chunks[-1]["choices"][0]["finish_reason"] == "stop"


def test_a_file_under_image_root_answers_like_predict(client, shapes, expected):
    for ref in ("test_00000.png", f"file://{_image(shapes)}", str(_image(shapes))):
        assert answer(client, ask(QUESTIONS[0], ref)) == expected[0], ref


LONG = "lorem ipsum dolor " * 2000


@pytest.mark.parametrize(
    "body, status, code, param",
    [
        (ask("hi", "data:image/png;base64,@@not-base64@@"), 400, "invalid_image", "messages[0].content[0].image_url"),
        (ask("hi", "data:image/png;base64," + base64.b64encode(b"hello").decode()), 400, "invalid_image", None),
        (ask("hi", "../train.json"), 403, "image_outside_root", "messages[0].content[0].image_url"),
        (ask("hi", "file:///etc/hostname"), 403, "image_outside_root", None),
        (ask("hi", "https://example.com/x.png"), 400, "remote_images_disabled", None),
        (ask(LONG, "SHAPE"), 400, "context_length_exceeded", "messages"),
        (ask("hi", "SHAPE", max_tokens=100000), 400, "context_length_exceeded", "messages"),
        ({"messages": [{"role": "user", "content": "<image> hi"}]}, 400, None, "messages[0]"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 400, None, "messages[0]"),
        (ask("hi", "SHAPE", n=2), 400, "unsupported_parameter", "n"),
        (ask("hi", "SHAPE", temperature=3), 400, None, "temperature"),
        (ask("hi", "SHAPE", frobnicate=1), 400, "unrecognized_argument", "frobnicate"),
        (ask("hi", "SHAPE", model="another"), 404, "model_not_found", "model"),
        (b"{not json", 400, None, None),
        ([1, 2], 400, None, None),
    ],
)
def test_bad_requests_get_their_4xx_and_the_server_keeps_serving(client, shapes, expected, body, status, code, param):
    if isinstance(body, dict):
        body = json.loads(json.dumps(body).replace('"SHAPE"', json.dumps(data_url(_image(shapes)))))
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v1/chat/completions", content=content, headers={"Content-Type": "application/json"})
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"] and "Traceback" not in r.text
    assert (code is None or error["code"] == code) and (param is None or error["param"] == param)
    assert answer(client, ask(QUESTIONS[0], data_url(_image(shapes)))) == expected[0]  # still serving


def test_models_health_page_and_unknown_paths(client):
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and [m["id"] for m in models["data"]] == [NAME]
    health = client.get("/health").json()
    assert health["status"] == "ok" and health["model"] == NAME and health["queued"] == 0
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"] and "<script>" in page.text
    assert 'src="http' not in page.text and 'href="http' not in page.text  # nothing from the network: works offline
    missing = client.get("/v1/nothing")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"


def test_api_key(lora_predictor, shapes, expected):
    app = create_app(Engine(lora_predictor, max_tokens=MAX), NAME, ServeOptions(api_key="s3cret"))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c:
        body = ask(QUESTIONS[0], data_url(_image(shapes)))
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            r = c.post("/v1/chat/completions", json=body, headers=headers)
            assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
            assert r.headers["www-authenticate"] == "Bearer"
        assert c.get("/v1/models").status_code == 401 and c.get("/health").status_code == 200
        r = c.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == expected[0]


class Gate:
    """Holds every generation of `predictor` until `open()`, and records the batch sizes."""

    def __init__(self, predictor, monkeypatch):
        self.sizes: list[int] = []
        self.entered = threading.Semaphore(0)
        self._open = threading.Event()
        real = predictor.generate_ids

        def held(ids, images, sampling, streamer=None):
            self.sizes.append(len(ids))
            self.entered.release()
            assert self._open.wait(30)
            return real(ids, images, sampling, streamer)

        monkeypatch.setattr(predictor, "generate_ids", held)

    def open(self) -> None:
        self._open.set()


def _wait_for(client: httpx.Client, key: str, value: int) -> None:
    deadline = time.monotonic() + 30
    while client.get("/health").json()[key] != value:
        assert time.monotonic() < deadline, f"/health never showed {key}={value}"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def gated_predictor(lora_run):
    return load_predictor(lora_run)


def test_requests_that_arrive_together_are_batched(gated_predictor, shapes, expected, monkeypatch):
    gate = Gate(gated_predictor, monkeypatch)
    app = create_app(Engine(gated_predictor, max_batch=4, queue_size=8, max_tokens=MAX), NAME)
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(4) as pool:
        post = lambda i: c.post("/v1/chat/completions", json=ask(QUESTIONS[i], data_url(_image(shapes, i))))  # noqa: E731
        first = pool.submit(post, 0)
        assert gate.entered.acquire(timeout=30)  # the first request is generating, alone
        rest = [pool.submit(post, i) for i in (0, 1, 2)]
        _wait_for(c, "queued", 3)
        gate.open()
        answers = [f.result().json()["choices"][0]["message"]["content"] for f in [first, *rest]]
    assert gate.sizes == [1, 3]
    assert answers == [expected[0], expected[0], expected[1], expected[2]]


def test_a_full_queue_answers_429_with_retry_after(gated_predictor, shapes, expected, monkeypatch):
    gate = Gate(gated_predictor, monkeypatch)
    app = create_app(Engine(gated_predictor, max_batch=1, queue_size=1, max_tokens=MAX), NAME)
    body = ask(QUESTIONS[0], data_url(_image(shapes)))
    with serving(app) as url, httpx.Client(base_url=url, timeout=60) as c, ThreadPoolExecutor(2) as pool:
        running = pool.submit(c.post, "/v1/chat/completions", json=body)
        assert gate.entered.acquire(timeout=30)
        waiting = pool.submit(c.post, "/v1/chat/completions", json=body)
        _wait_for(c, "queued", 1)
        flood = [c.post("/v1/chat/completions", json=body) for _ in range(3)]
        gate.open()
        assert [f.result().status_code for f in (running, waiting)] == [200, 200]
        after = c.post("/v1/chat/completions", json=body)
    for r in flood:
        assert r.status_code == 429 and int(r.headers["retry-after"]) >= 1
        assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"
    assert after.status_code == 200 and after.json()["choices"][0]["message"]["content"] == expected[0]
