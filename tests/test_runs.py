"""Run folders: which checkpoints count as complete (manifest, sizes, file structure), and the metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file

from lora_llava.runs import MANIFEST, RunPaths, checkpoint_problem, read_metrics, truncate_metrics, write_manifest

FILES = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "optimizer.pt",
    "scheduler.pt",
    "rng_state.pth",
    "trainer_state.json",
    "recipe.yaml",
    "README.md",
)


def _checkpoint(folder: Path, step: int = 4, manifest: bool = True) -> Path:
    """A checkpoint laid out as LlavaTrainer writes one, with small real files of each kind."""
    folder.mkdir(parents=True)
    (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    save_file({"a": torch.randn(8, 4), "b": torch.zeros(3)}, str(folder / "adapter_model.safetensors"))
    torch.save({"state": {0: {"exp_avg": torch.randn(64, 64)}}, "param_groups": [{"lr": 1e-3}]}, folder / "optimizer.pt")
    torch.save({"last_epoch": step}, folder / "scheduler.pt")
    torch.save({"python": (3, (1, 2), None), "cpu": torch.zeros(16, dtype=torch.uint8)}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step, "log_history": []}))
    (folder / "recipe.yaml").write_text(yaml.safe_dump({"stage": "instruct", "train": {"output_dir": "x"}}))
    (folder / "README.md").write_text("# an adapter\n")
    if manifest:
        write_manifest(folder)
    return folder


def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _garbage(p: Path) -> None:
    """Same size, other bytes: what a bad sector or a copy that went wrong leaves."""
    p.write_bytes((bytes(range(256)) * (p.stat().st_size // 256 + 1))[: p.stat().st_size])


def test_a_whole_checkpoint_is_complete_with_and_without_a_manifest(tmp_path):
    assert checkpoint_problem(_checkpoint(tmp_path / "checkpoint-4")) is None
    listed = json.loads((tmp_path / "checkpoint-4" / MANIFEST).read_text())["files"]
    assert sorted(listed) == sorted(FILES)
    assert checkpoint_problem(_checkpoint(tmp_path / "checkpoint-2", manifest=False)) is None  # an older version's


@pytest.mark.parametrize("name", FILES)
@pytest.mark.parametrize("damage", ["truncate", "garbage", "delete"])
def test_any_damaged_file_makes_the_checkpoint_incomplete_and_is_named(tmp_path, name, damage):
    folder = _checkpoint(tmp_path / "checkpoint-4")
    target = folder / name
    {"truncate": _truncate, "garbage": _garbage, "delete": Path.unlink}[damage](target)
    problem = checkpoint_problem(folder)
    if damage == "garbage" and name == "README.md":
        assert problem is None  # same size and no structure to check: harmless to a resume
        return
    assert problem is not None and problem.startswith(f"{name}: "), problem


@pytest.mark.parametrize("name", [f for f in FILES if f != "README.md"])
def test_without_a_manifest_the_structure_of_each_file_is_still_checked(tmp_path, name):
    folder = _checkpoint(tmp_path / "checkpoint-4", manifest=False)
    _garbage(folder / name)
    problem = checkpoint_problem(folder)
    assert problem is not None and problem.startswith(f"{name}: "), problem


def test_a_torn_manifest_or_missing_state_is_incomplete(tmp_path):
    folder = _checkpoint(tmp_path / "checkpoint-4")
    (folder / MANIFEST).write_text('{"files": {"adapter')
    assert checkpoint_problem(folder) == f"{MANIFEST}: unreadable"
    legacy = _checkpoint(tmp_path / "checkpoint-2", manifest=False)
    (legacy / "trainer_state.json").unlink()
    assert checkpoint_problem(legacy) == "trainer_state.json: missing"
    assert checkpoint_problem(tmp_path / "checkpoint-9") == "not a folder"


def test_run_paths_list_complete_checkpoints_and_say_what_is_wrong_with_the_others(tmp_path):
    for step in (2, 4, 6):
        _checkpoint(tmp_path / f"checkpoint-{step}", step)
    _truncate(tmp_path / "checkpoint-6" / "optimizer.pt")
    (tmp_path / "damaged-checkpoint-8").mkdir()  # set aside by an earlier resume: not a checkpoint
    paths = RunPaths(tmp_path)
    assert [p.name for p in paths.checkpoints()] == ["checkpoint-2", "checkpoint-4"]
    every = {p.name: problem for p, problem in paths.all_checkpoints()}
    assert sorted(every) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    assert every["checkpoint-6"].startswith("optimizer.pt: ") and "truncated" in every["checkpoint-6"]


def test_checkpoints_of_other_layouts_keep_working(tmp_path):
    """DeepSpeed and FSDP write their own folders and file names: the manifest lists whatever is there."""
    folder = _checkpoint(tmp_path / "checkpoint-4")
    (folder / "optimizer.pt").unlink()
    (folder / "scheduler.pt").unlink()
    shard = folder / "global_step4"
    shard.mkdir()
    torch.save({"optimizer_state_dict": {}}, shard / "zero_pp_rank_0_mp_rank_00_optim_states.pt")
    (shard / "__0_0.distcp").write_bytes(b"\x01" * 100)
    (folder / "latest").write_text("global_step4")
    write_manifest(folder)
    assert checkpoint_problem(folder) is None
    _truncate(shard / "__0_0.distcp")
    assert checkpoint_problem(folder).startswith("global_step4/__0_0.distcp: ")


def test_truncate_metrics_keeps_rows_up_to_the_step_and_drops_torn_lines(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "loss": 1.0 / s} for s in range(1, 6)]
    text = "".join(json.dumps(r) + "\n" for r in rows)
    path.write_bytes(text.encode() + b'[1, 2]\n{"step": "x"}\n\xff\xfe\n{"step": 6, "lo')  # odd rows, then a kill mid-line
    assert [r["step"] for r in read_metrics(path)] == [1, 2, 3, 4, 5, "x"]
    truncate_metrics(path, 3)
    assert read_metrics(path) == rows[:3]
    assert path.read_text().endswith("\n")  # the next row starts on its own line
    truncate_metrics(tmp_path / "none.jsonl", 3)  # no log yet: nothing to do
    assert not (tmp_path / "none.jsonl").exists()


def test_write_manifest_is_atomic_and_lists_nested_files(tmp_path):
    folder = _checkpoint(tmp_path / "c")
    (folder / "sub").mkdir()
    (folder / "sub" / "x.bin").write_bytes(b"")
    write_manifest(folder)
    listed = json.loads((folder / MANIFEST).read_text())["files"]
    assert listed["sub/x.bin"] == 0 and MANIFEST not in listed
    assert not [p for p in folder.iterdir() if p.name.endswith(".tmp")]
