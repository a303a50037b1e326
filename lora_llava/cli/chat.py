"""`lora-llava chat --model RUN_OR_MODEL [--image PATH]`: talk about an image in the terminal.

Each line is a question; answers follow on their own line and the
conversation is kept (in the model's template) until `/reset` or `/image`.
Works the same with piped input, one question or command per line.
"""

from __future__ import annotations

import sys
from typing import TextIO

from .predict import add_model_args, add_sampling_args, load, sampling

HELP = "commands: /image PATH (talk about another image: a new conversation), /reset (forget the conversation), /quit"


def register(sub, common) -> None:
    p = sub.add_parser(
        "chat",
        parents=[common],
        help="an interactive conversation about an image",
        description="Talk about an image in the terminal with a model, a run folder or a merged checkpoint "
        "(/image PATH, /reset, /quit; reads piped input too).",
    )
    add_model_args(p)
    p.add_argument("--image", metavar="PATH", help="the image to talk about (or /image PATH later)")
    add_sampling_args(p, max_new_tokens=512)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..evaluate.generate import ChatSession

    session = ChatSession(load(args), args.image, sampling(args))
    return repl(session, sys.stdin, sys.stdout, sys.stderr)


def repl(session, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    """Read questions and commands until /quit or the end of input; answers go to stdout, notices to stderr."""
    from ..errors import LoraLlavaError

    interactive = stdin.isatty()
    if interactive:
        print(HELP, file=stderr)
    while True:
        if interactive:
            stdout.write("you> ")
            stdout.flush()
        line = stdin.readline()
        if not line:
            return 0
        text = line.strip()
        if not text:
            continue
        try:
            if text in ("/quit", "/exit"):
                return 0
            if text == "/reset":
                session.reset()
                print("(new conversation)", file=stderr)
            elif text == "/image" or text.startswith("/image "):
                path = text[len("/image") :].strip()
                if not path:
                    raise LoraLlavaError("/image: give the image's path")
                session.load_image(path)
                print(f"(image {path}: new conversation)", file=stderr)
            elif text.startswith("/"):
                print(f"unknown command {text.split()[0]}; {HELP}", file=stderr)
            else:
                print(session.ask(text), file=stdout, flush=True)
        except LoraLlavaError as e:  # a bad path or prompt ends the turn, not the session
            print(f"error: {e}", file=stderr, flush=True)
