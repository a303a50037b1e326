"""The command line explains itself: a description per verb, `train --help` with overrides, resume and an example,
and a mistyped verb answered with the closest one."""

from __future__ import annotations

import argparse

import pytest

from lora_llava.cli import build_parser, main


def _verbs() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def test_every_verb_has_a_one_line_description():
    verbs = _verbs()
    assert {"train", "eval", "make-tiny", "demo"} <= set(verbs)
    for name, parser in verbs.items():
        assert parser.description and "\n" not in parser.description.strip(), name


def test_each_verb_help_shows_its_description(capsys):
    for name, parser in _verbs().items():
        with pytest.raises(SystemExit) as exit_:
            main([name, "--help"])
        assert exit_.value.code == 0
        assert parser.description.split(";")[0][:40] in capsys.readouterr().out, name


def test_train_help_shows_overrides_resume_and_an_example(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for text in (
        "key.path=value",
        "the value is YAML",
        "data.train.0.path=",
        "2:train.max_steps=10",
        "N:key=value applies to stage N only",
        "resumes from the newest complete checkpoint-N",
        "--resume CHECKPOINT   resume from that checkpoint folder",
        "--no-resume           refuse to resume",
        "--overwrite           empty the output folder",
        "example:\n  lora-llava train recipes/medical.yaml ",
    ):
        assert text in out, text


@pytest.mark.parametrize(("typed", "meant"), [("trian", "train"), ("make_tiny", "make-tiny"), ("evl", "eval"), ("merg", "merge")])
def test_a_mistyped_verb_suggests_the_closest_one(typed, meant, capsys):
    assert main([typed, "x.yaml"]) == 2
    captured = capsys.readouterr()
    assert captured.err == f"lora-llava: unknown command '{typed}' (did you mean '{meant}'?)\n"
    assert captured.out == ""


def test_a_word_like_no_verb_lists_the_verbs(capsys):
    assert main(["--debug", "zzzz"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lora-llava: unknown command 'zzzz' (commands: train, ") and "make-tiny" in err


def test_version_and_a_known_verb_are_left_to_argparse(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.startswith("lora-llava ")
    with pytest.raises(SystemExit) as exit_:
        main(["train"])  # no recipe: argparse's usage error
    assert exit_.value.code == 2 and "unknown command" not in capsys.readouterr().err
