"""The one rule that turns an exception into one line, and the atomic writes every output goes through."""

from __future__ import annotations

import pytest

from lora_llava.errors import OutputError, describe, first_line
from lora_llava.io import atomic_dir, atomic_write_text, move_into, refuse_nonempty


def raised(exc: BaseException) -> BaseException:
    try:
        raise exc
    except BaseException as e:  # noqa: BLE001 - the test wants the exception with its traceback
        return e


def test_first_line_of_a_message():
    assert first_line(ValueError("\n  bad value\nmore detail")) == "bad value"
    assert describe(ValueError("bad value\nmore")) == "ValueError: bad value"


@pytest.mark.parametrize("exc", [IndexError(), OSError(), KeyError(), RuntimeError("   \n ")])
def test_an_empty_message_still_says_what_and_where(exc):
    line = first_line(raised(exc))
    assert type(exc).__name__ in line and "no message" in line
    assert "test_errors.py:" in line and "in raised" in line  # where it was raised
    assert "\n" not in line and describe(raised(exc)).startswith(type(exc).__name__)


def test_cli_prints_one_useful_line_for_an_empty_internal_error(monkeypatch, capsys):
    from lora_llava import cli
    from lora_llava.cli import recipe as recipe_verb

    def broken(args):
        return [][0]  # IndexError with an empty-looking message ("list index out of range" is its text)

    def silent(args):
        raise KeyError()

    monkeypatch.setattr(recipe_verb, "run", silent)
    assert cli.main(["recipe"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lora-llava recipe: internal error: KeyError (no message) at ")
    assert "in silent" in err[0] and "--debug" in err[0]
    monkeypatch.setattr(recipe_verb, "run", broken)
    assert cli.main(["recipe"]) == 1
    assert "internal error: IndexError: list index out of range" in capsys.readouterr().err


def test_refuse_nonempty(tmp_path):
    refuse_nonempty(tmp_path / "new", "--output", overwrite=False)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep")
    with pytest.raises(OutputError, match=r"--output: .*full exists and is not empty \(use --overwrite"):
        refuse_nonempty(tmp_path / "full", "--output", overwrite=False)
    refuse_nonempty(tmp_path / "full", "--output", overwrite=True)
    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputError, match="is not a folder"):
        refuse_nonempty(tmp_path / "file", "DST", overwrite=True)


def test_atomic_dir_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_dir(target, "--output", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("fails halfway")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no leftover
    assert (target / "old.txt").read_text() == "old"
    with atomic_dir(target, "--output", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        assert not (target / "new.txt").exists()
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    with pytest.raises(OutputError):
        with atomic_dir(target, "--output", overwrite=False):
            pass


def test_move_into_puts_configs_last_and_atomic_write_text(tmp_path):
    staged, root = tmp_path / "staged", tmp_path / "root"
    staged.mkdir()
    root.mkdir()
    (root / "adapter_model.safetensors").write_text("old")
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        (staged / name).write_text("new")
    order = []
    import os

    real = os.replace
    os.replace = lambda a, b: order.append(os.path.basename(b)) or real(a, b)
    try:
        move_into(staged, root)
    finally:
        os.replace = real
    assert order == ["adapter_model.safetensors", "adapter_config.json"] and not staged.exists()
    assert (root / "adapter_model.safetensors").read_text() == "new"
    atomic_write_text(root / "recipe.yaml", "a: 1\n")
    atomic_write_text(root / "recipe.yaml", "a: 2\n")
    assert (root / "recipe.yaml").read_text() == "a: 2\n"
    assert sorted(p.name for p in root.iterdir()) == ["adapter_config.json", "adapter_model.safetensors", "recipe.yaml"]


@pytest.mark.parametrize(
    "errno_, expected", [(28, "error: no space left on device writing /data/run/x.bin"), (5, "internal error")]
)
def test_a_full_disk_is_one_line_not_an_internal_error(monkeypatch, capsys, errno_, expected):
    """ENOSPC from anywhere (a library writing a file) is the machine's state; other OSErrors stay bugs to report."""
    import os

    from lora_llava.cli import main, recipe

    def fails(args):
        raise OSError(errno_, os.strerror(errno_), "/data/run/x.bin")

    monkeypatch.setattr(recipe, "run", fails)
    assert main(["recipe"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and expected in err[0], err
