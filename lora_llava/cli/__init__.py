"""`lora-llava VERB ...`: parse arguments, call the library, map errors to exit codes.

Each verb lives in its own small module with `register(subparsers)`; this
module only dispatches. Errors a user can cause (`LoraLlavaError`) print one
line and exit 2 (input / usage) or 1 (run time); `--debug` shows tracebacks.
"""

from __future__ import annotations

import argparse
import difflib
import errno
import importlib
import logging
import os
import sys
import warnings

VERBS = ("train", "recipe", "recipes", "check", "estimate", "merge", "predict", "chat", "eval", "serve", "demo", "make_tiny", "convert")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="lora-llava", description="LoRA / QLoRA domain adaptation of LLaVA-1.5, faithful to the paper."
    )
    parser.add_argument("--version", action="version", version=f"lora-llava {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for name in VERBS:
        importlib.import_module(f".{name}", __name__).register(sub, common)
    return parser


def main(argv: list[str] | None = None) -> int:
    from .. import distributed
    from ..errors import LoraLlavaError

    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    logging.basicConfig(level=logging.INFO if debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if not debug:
        # Library chatter that is not about the user's run: bitsandbytes' optional kernels package,
        # deprecation notices raised inside transformers itself.
        logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
        warnings.filterwarnings("ignore", category=FutureWarning)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    mistyped = unknown_verb(parser, argv)
    if mistyped:
        print(mistyped, file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    distributed.name_accelerator()
    distributed.quiet_replicas()
    try:
        return int(args.func(args) or 0)
    except LoraLlavaError as e:
        if debug:
            raise
        print(distributed.name_rank(f"lora-llava {args.verb}: error: {e}"), file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(distributed.name_rank(f"lora-llava {args.verb}: interrupted"), file=sys.stderr)
        return 130
    except Exception as e:  # a bug, or an environment problem: one line unless --debug
        if debug:
            raise
        print(distributed.name_rank(_unexpected(args.verb, e)), file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()  # a rank that leaves the group lets the launcher stop the others instead of leaving them waiting


def unknown_verb(parser: argparse.ArgumentParser, argv: list[str]) -> str | None:
    """The line for a verb that is not one (None when it is, or when there is none), with the closest verb.

    argparse would print the usage and every choice; one suggestion is what a typo needs.
    """
    verb = next((a for a in argv if not a.startswith("-")), None)
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    names = list(sub.choices)  # as registered: make_tiny is `make-tiny`
    if verb is None or verb in names:
        return None
    close = difflib.get_close_matches(verb, names, n=1, cutoff=0.6)
    hint = f"did you mean {close[0]!r}?" if close else f"commands: {', '.join(names)}"
    return f"lora-llava: unknown command {verb!r} ({hint})"


def _unexpected(verb: str, e: Exception) -> str:
    """The line for an exception no lora-llava code raised: a full disk is the machine's state, anything else a bug."""
    from ..errors import describe

    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        where = f" writing {e.filename}" if e.filename else ""
        return f"lora-llava {verb}: error: no space left on device{where}; free some space and run the command again"
    return f"lora-llava {verb}: internal error: {describe(e)} (run again with --debug for the traceback)"
