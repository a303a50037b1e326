"""The bad-input corpus (tests/bad_inputs): exact one-line errors, exit codes, untouched output folders.

Cases run in-process through `lora_llava.cli.main` (the same code path as the
console script, without paying the import cost per case); one case also runs
as a real subprocess to pin the absence of a traceback.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image
from safetensors.torch import load_file

from tests.helpers import run_cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)  # a PNG header, then nothing usable
    (folder / "loop.png").symlink_to("loop.png")  # a link to itself
    (folder / "loopdir").symlink_to("loopdir")  # a folder that is a link to itself
    (folder / "dangling.png").symlink_to("gone.png")
    return folder


class _Refused:
    """Stands for a malicious object: torch.load(weights_only=True) must refuse to rebuild it."""

    def __reduce__(self):
        return (os.getpid, ())


@pytest.fixture(scope="module")
def pickled_model(tmp_path_factory, tiny_model) -> Path:
    """The tiny model with its weights as a pytorch_model.bin that also holds a Python object."""
    folder = tmp_path_factory.mktemp("pickled")
    for f in tiny_model.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, folder / f.name)
    torch.save({**load_file(str(tiny_model / "model.safetensors")), "extra": _Refused()}, folder / "pytorch_model.bin")
    return folder


PLACEHOLDERS = re.compile(r"\{(model|images|data|out|pickled_model|next_model)\}")


def _fill(text: str, values: dict[str, str]) -> str:
    return PLACEHOLDERS.sub(lambda m: values[m.group(1)], text)


def _command(case: dict, recipe: Path | None, values: dict[str, str]) -> list[str]:
    """The command line of a case: `verb` (default train) and its recipe, then the case's arguments."""
    verb = case.get("verb", "train")
    args = [_fill(a, values) for a in case.get("args", [])]
    head = [verb, str(recipe)] if recipe is not None else [verb]
    return [*head, *args, *(["--overwrite"] if verb == "train" else [])]


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_its_line_and_exit_code(name, request, tiny_model, images, pickled_model, tmp_path, capsys, monkeypatch):
    from lora_llava.cli import main

    case = CASES[name]
    for key, value in case.get("env", {}).items():  # what a launcher (accelerate, torchrun) would export
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a file that must survive")
    values = {
        "model": str(tiny_model),
        "images": str(images),
        "data": str(CORPUS / "data"),
        "out": str(out),
        "pickled_model": str(pickled_model),
    }
    if "{next_model}" in str(case):  # the LLaVA-NeXT cases: built only when one runs
        values["next_model"] = str(request.getfixturevalue("tiny_next"))
    recipe = None
    if "recipe" in case:
        source, recipe = CORPUS / "recipes" / case["recipe"], tmp_path / case["recipe"]
        if source.exists():  # files that are not UTF-8 text on purpose are copied as they are
            raw = source.read_bytes()
            try:
                recipe.write_text(_fill(raw.decode("utf-8"), values), encoding="utf-8")
            except UnicodeDecodeError:
                recipe.write_bytes(raw)

    code = main(_command(case, recipe, values))
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    errors = [line for line in err if line.startswith(f"lora-llava {case.get('verb', 'train')}: error:")]
    assert "internal error" not in captured.err + captured.out, err  # reserved for bugs in lora-llava itself
    assert code == case["exit"], err
    assert len(errors) == 1, err
    assert _fill(case["error"], values) in errors[0]
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # even with --overwrite: nothing started


def test_the_corpus_covers_every_class_of_bad_input():
    """At least 60 cases, each with its exact line and exit code; every verb named exists."""
    from lora_llava.cli import VERBS

    assert len(CASES) >= 60
    for name, case in CASES.items():
        assert case["error"] and case["exit"] in (1, 2), name
        assert case.get("verb", "train") in VERBS, name


def test_a_bad_recipe_through_the_console_script_prints_no_traceback(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text((CORPUS / "recipes" / "typo.yaml").read_text())
    result = run_cli("train", str(recipe))
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert "train.lerning_rate: unknown key (did you mean train.learning_rate?)" in result.stderr


def test_nothing_is_unpickled_and_yaml_is_read_safely():
    """Loading a stranger's files must not run their code."""
    package = Path(__file__).resolve().parents[1] / "lora_llava"
    for path in package.rglob("*.py"):
        text = path.read_text()
        for m in re.finditer(r"torch\.load\(([^)]*)\)", text):
            assert "weights_only=True" in m.group(1), f"{path}: torch.load without weights_only=True"
        assert not re.search(r"\bpickle\.loads?\(", text), f"{path}: pickle"
        assert not re.search(r"yaml\.(unsafe_)?load\(", text), f"{path}: yaml.load (use yaml.safe_load)"
        assert "trust_remote_code=True" not in text, f"{path}: trust_remote_code forced on"
