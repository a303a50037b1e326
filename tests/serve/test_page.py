"""The chat page of `lora-llava serve`, driven in headless Chromium over the DevTools protocol.

Chromium talks DevTools over a pipe (`--remote-debugging-pipe`: it reads
commands on fd 3 and writes replies on fd 4, each a JSON message ended by a
NUL byte), so no WebSocket client is needed. The page is used as a person
uses it: a generated image goes into the file input, a question is typed and
sent, and the answer is read from the page once it says it is done; it must
be the library's answer to the same image and questions.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import shutil
import subprocess
import sys
import time

import pytest
from PIL import Image, ImageDraw

from lora_llava.evaluate.generate import ChatSession, Sampling
from lora_llava.serve.app import create_app
from lora_llava.serve.engine import Engine
from tests.helpers import serving

pytestmark = pytest.mark.e2e
MAX = 8
BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


class DevTools:
    """A minimal DevTools client over Chromium's debugging pipe."""

    def __init__(self, binary: str, profile) -> None:
        to_browser, self._write = os.pipe()
        self._read, from_browser = os.pipe()
        # Chromium's ends above 9, so that moving them to 3 and 4 cannot overwrite one with the other.
        to_browser, from_browser = (self._above_nine(fd) for fd in (to_browser, from_browser))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run"]
        args += ["--remote-debugging-pipe", f"--user-data-dir={profile}", "about:blank"]
        # A small Python step moves the pipe ends to fds 3 and 4 and execs Chromium (a preexec_fn would
        # not be safe beside the server's threads, and sh takes only one-digit fd numbers).
        move = "import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); os.execv(sys.argv[3], sys.argv[3:])"
        self.process = subprocess.Popen(
            [sys.executable, "-c", move, str(to_browser), str(from_browser), binary, *args],
            pass_fds=(to_browser, from_browser),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser)
        os.close(from_browser)
        self._buffer, self._id, self.session = b"", 0, None

    @staticmethod
    def _above_nine(fd: int) -> int:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
        os.close(fd)
        return high

    def send(self, method: str, timeout: float = 30, **params) -> dict:
        self._id += 1
        message = {"id": self._id, "method": method, "params": params}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._write, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self._next(deadline)
            if reply.get("id") == self._id:  # events and other replies are not needed here
                assert "error" not in reply, reply["error"]
                return reply["result"]

    def _next(self, deadline: float) -> dict:
        while b"\0" not in self._buffer:
            ready, _, _ = select.select([self._read], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "Chromium did not answer in time"
            data = os.read(self._read, 1 << 16)
            assert data, "Chromium closed the pipe"
            self._buffer += data
        message, self._buffer = self._buffer.split(b"\0", 1)
        return json.loads(message)

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", url=url)["targetId"]
        self.session = self.send("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def evaluate(self, expression: str):
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 30):
        """The value of `expression` once it is truthy."""
        deadline = time.monotonic() + timeout
        while not (value := self.evaluate(expression)):
            assert time.monotonic() < deadline, f"never true in the page: {expression}"
            time.sleep(0.05)
        return value

    def close(self) -> None:
        self.process.kill()
        self.process.wait(10)
        os.close(self._read)
        os.close(self._write)


LAST_ANSWER = """(() => {
  const answers = document.querySelectorAll(".msg.assistant");
  const last = answers[answers.length - 1];
  return last && last.dataset.state !== "streaming" ? [answers.length, last.dataset.state, last.querySelector(".text").textContent] : null;
})()"""


def ask(browser: DevTools, question: str, count: int) -> tuple[str, str]:
    """Type `question`, send it, and wait for answer number `count`: (state, text)."""
    browser.evaluate(f'document.getElementById("question").value = {json.dumps(question)}')
    browser.evaluate('document.getElementById("send").click()')
    n, state, text = browser.wait_for(f"(() => {{ const a = {LAST_ANSWER}; return a && a[0] === {count} ? a : null; }})()")
    return state, text


@pytest.mark.skipif(BROWSER is None, reason="no chromium binary found (apt-get install chromium to run this test)")
def test_upload_ask_and_read_the_streamed_answer(lora_predictor, tmp_path):
    picture = Image.new("RGB", (80, 56), "white")  # not square: the page's image is padded as in training
    ImageDraw.Draw(picture).ellipse((20, 8, 60, 48), fill=(220, 30, 30))
    path = tmp_path / "red-circle.png"
    picture.save(path)
    session = ChatSession(lora_predictor, path, Sampling(MAX))
    first, second = session.ask("What colour is the shape?"), session.ask("Are you sure?")

    app = create_app(Engine(lora_predictor, max_tokens=MAX), "tiny-run")
    browser = DevTools(BROWSER, tmp_path / "profile")
    try:
        with serving(app) as url:
            browser.open(url + "/")
            browser.wait_for('document.readyState === "complete" && document.getElementById("model")?.textContent')
            root = browser.send("DOM.getDocument")["root"]["nodeId"]
            node = browser.send("DOM.querySelector", nodeId=root, selector="#file")["nodeId"]
            browser.send("DOM.setFileInputFiles", nodeId=node, files=[str(path)])
            browser.wait_for('document.getElementById("ask").dataset.image === "ready"')
            assert ask(browser, "What colour is the shape?", 1) == ("done", first)
            assert browser.evaluate('document.querySelector(".msg.user img").src.startsWith("data:image/png;base64,")')
            assert ask(browser, "Are you sure?", 2) == ("done", second)  # the conversation went back with its image
            browser.evaluate('document.getElementById("max").value = "100000"')
            state, text = ask(browser, "And now?", 3)
            assert state == "error" and "maximum context length" in text  # the API's message, shown in the page
    finally:
        browser.close()
