"""The bad-input corpus (tests/bad_inputs): exact one-line errors, exit codes, untouched output folders.

Cases run in-process through `lora_llava.cli.main` (the same code path as the
console script, without paying the import cost per case); one case also runs
as a real subprocess to pin the absence of a traceback.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.helpers import run_cli

CORPUS = Path(__file__).parent / "bad_inputs"
CASES = yaml.safe_load((CORPUS / "cases.yaml").read_text())


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("images")
    Image.new("RGB", (40, 30), (200, 10, 10)).save(folder / "a.png")
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 20)  # a PNG header, then nothing usable
    return folder


def _fill(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\{(model|images|data|out)\}", lambda m: values[m.group(1)], text)


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_input_gives_its_line_and_exit_code(name, tiny_model, images, tmp_path, capsys, monkeypatch):
    from lora_llava.cli import main

    case = CASES[name]
    for key, value in case.get("env", {}).items():  # what a launcher (accelerate, torchrun) would export
        monkeypatch.setenv(key, value)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("a file that must survive")
    values = {"model": str(tiny_model), "images": str(images), "data": str(CORPUS / "data"), "out": str(out)}
    source = CORPUS / "recipes" / case["recipe"]
    recipe = tmp_path / case["recipe"]
    if source.exists():
        recipe.write_text(_fill(source.read_text(), values))
    args = ["train", str(recipe), *(_fill(a, values) for a in case.get("args", [])), "--overwrite"]

    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    errors = [line for line in err if line.startswith("lora-llava train: error:")]
    assert code == case["exit"]
    assert len(errors) == 1, err
    assert case["error"] in errors[0]
    assert "Traceback" not in "\n".join(err)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # even with --overwrite: nothing started


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
