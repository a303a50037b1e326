"""Several processes: `torchrun -m lora_llava train` on two CPU ranks (gloo), the data each rank sees, rank-named errors.

Data parallel with text-only batches in the mixture is run here, through
torchrun; the shipped ZeRO and FSDP configs, and a killed run resumed, are
launched through `accelerate launch` in test_engines.py.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from lora_llava.distributed import DUMP_ENV, name_rank
from tests.helpers import ROOT, recipe_dict, write_recipe


def torchrun(*args: str, env: dict | None = None, timeout: int = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 -m lora_llava ARGS`, as a user types it."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "lora_llava", *args]
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=timeout)


def _losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert len(steps) == len(set(steps)), f"a step was logged more than once: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def _adapter_name(param_name: str) -> str:
    """The key peft writes for a live parameter name (adapter name and modules_to_save wrapper dropped)."""
    return param_name.replace(".default", "").replace("modules_to_save.", "")


STEPS = 4
N_TEXT = 16  # text-only samples beside the 36 image samples of `shapes`: with seed 0, step 1 is a text-only batch


def _text_only_steps(n_image: int, n_text: int, batch: int, world: int) -> list[int]:
    """Optimizer steps whose batches hold only text (the trainer's own sampler, seed 0)."""
    from lora_llava.training.trainer import LlavaTrainer

    lengths = [1] * n_image + [-1] * n_text
    args = SimpleNamespace(
        per_device_train_batch_size=batch, gradient_accumulation_steps=1, world_size=world, data_seed=0, seed=0
    )
    order = list(LlavaTrainer._get_train_sampler(SimpleNamespace(lengths=lengths, args=args)))
    size = batch * world
    return [s + 1 for s in range(len(order) // size) if all(lengths[i] < 0 for i in order[s * size : (s + 1) * size])]


@pytest.fixture(scope="module")
def mixture(tmp_path_factory, shapes) -> list[dict]:
    """Image samples plus text-only ones, as LLaVA-1.5's mixture has (a text-only batch never reaches the projector)."""
    folder = tmp_path_factory.mktemp("text")
    text = [
        {
            "id": f"text-{i}",
            "conversations": [{"from": "human", "value": f"What is {i} plus {i}?"}, {"from": "gpt", "value": str(2 * i)}],
        }
        for i in range(N_TEXT)
    ]
    (folder / "text.json").write_text(json.dumps(text))
    assert len(json.loads((shapes / "train.json").read_text())) == 36
    assert [s for s in _text_only_steps(36, N_TEXT, 2, 2) if s <= STEPS], "no text-only batch among the steps run: change N_TEXT"
    return [{"path": str(shapes / "train.json"), "image_folder": str(shapes / "images")}, {"path": str(folder / "text.json")}]


def _recipe(tiny_model, shapes, mixture, out: Path, batch_size: int) -> dict:
    train = {"batch_size": batch_size, "max_steps": STEPS, "save_steps": 2}
    return recipe_dict(tiny_model, shapes, out, data={"train": mixture}, train=train)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, tiny_model, shapes, mixture):
    """STEPS steps on 2 ranks x batch 2, through `torchrun ... -m lora_llava train`."""
    work = tmp_path_factory.mktemp("ddp")
    recipe = write_recipe(work / "recipe.yaml", _recipe(tiny_model, shapes, mixture, work / "run", batch_size=2))
    result = torchrun("train", str(recipe), env={DUMP_ENV: str(work / "ranks")})
    assert result.returncode == 0, result.stderr[-4000:]
    return SimpleNamespace(work=work, run=work / "run", result=result)


def test_two_ranks_finish_in_step_and_write_one_run_folder(two_ranks):
    out = two_ranks.result.stdout
    assert out.count("global batch 2 x 1 x 2 process(es) = 4") == 1  # printed by rank 0 only
    assert out.count("trainable parameters:") == 1 and out.count("done:") == 1
    assert sorted(p.name for p in two_ranks.work.iterdir()) == ["ranks", "recipe.yaml", "run"]
    run = two_ranks.run
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]  # no staging left behind
    assert sorted(p.name for p in run.glob("checkpoint-*")) == ["checkpoint-2", f"checkpoint-{STEPS}"]
    # Model, optimizer and trainer state once (rank 0); each rank's RNG state for an exact resumption.
    assert {"rng_state_0.pth", "rng_state_1.pth", "trainer_state.json", "adapter_model.safetensors"} <= {
        p.name for p in (run / "checkpoint-2").iterdir()
    }
    assert sorted(_losses(run)) == list(range(1, STEPS + 1))  # metrics written once, by rank 0

    ranks = [load_file(str(two_ranks.work / "ranks" / f"rank{r}.safetensors")) for r in (0, 1)]
    assert ranks[0].keys() == ranks[1].keys() and len(ranks[0]) > 0
    for k in ranks[0]:
        assert torch.equal(ranks[0][k], ranks[1][k]), f"ranks diverged on {k}"
    adapter = load_file(str(run / "adapter_model.safetensors"))
    assert {_adapter_name(k) for k in ranks[0]} == set(adapter)
    for k, v in ranks[0].items():
        assert torch.equal(adapter[_adapter_name(k)], v), k
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in adapter.items())  # it trained


def test_two_ranks_of_batch_b_match_one_process_of_batch_2b(two_ranks, tiny_model, shapes, mixture, tmp_path):
    """Same recipe and data order; DDP averages the two halves' gradients into the whole batch's."""
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    one_run = train(parse_recipe(_recipe(tiny_model, shapes, mixture, tmp_path / "one", batch_size=4)))
    one, two = _losses(one_run), _losses(two_ranks.run)
    assert sorted(one) == sorted(two) == list(range(1, STEPS + 1))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step
    a, b = load_file(str(one_run / "adapter_model.safetensors")), load_file(str(two_ranks.run / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5, msg=k)


def test_rank_0_failing_while_others_wait_stops_the_job(tiny_model, shapes, tmp_path):
    """Only rank 0 creates the run folder; when that fails, rank 1 (waiting at the barrier) must not hang.

    Launched with the shipped DDP config, as `accelerate launch --config_file configs/ddp.yaml` users do.
    """
    (tmp_path / "file").write_text("not a folder")
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_model, shapes, tmp_path / "file" / "run"))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(ROOT / "configs/ddp.yaml"),
        "--num_processes",
        "2",
    ]
    result = subprocess.run(
        [*cmd, "-m", "lora_llava", "train", str(recipe)], env=env, capture_output=True, text=True, timeout=240
    )
    assert result.returncode != 0
    assert "[rank 0] lora-llava train:" in result.stderr and "/file/run" in result.stderr, result.stderr[-3000:]
    assert re.search(r"rank\s*: 1 \(local_rank: 1\)", result.stderr)  # a second process ran, and was stopped


def test_cli_errors_name_the_rank_only_when_several_processes_run(monkeypatch):
    assert name_rank("lora-llava train: error: x") == "lora-llava train: error: x"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    assert name_rank("a: b\nc: d") == "[rank 3] a: b\n[rank 3] c: d"


# ----------------------------------------------------------------------------- what each rank reads


def _rank_batches(lengths: list[int], batch: int, accum: int, world: int, epoch: int) -> list[list[list[int]]]:
    """The batches each rank's data loader yields: the trainer's sampler, sharded by accelerate as in training."""
    from accelerate.data_loader import prepare_data_loader

    from lora_llava.training.trainer import LlavaTrainer

    args = SimpleNamespace(
        per_device_train_batch_size=batch, gradient_accumulation_steps=accum, world_size=world, data_seed=7, seed=7
    )
    sampler = LlavaTrainer._get_train_sampler(SimpleNamespace(lengths=lengths, args=args))
    loader = torch.utils.data.DataLoader(list(range(len(lengths))), batch_size=batch, sampler=sampler)
    shards = []
    for r in range(world):
        shard = prepare_data_loader(loader, device=torch.device("cpu"), num_processes=world, process_index=r, put_on_device=False)
        shard.set_epoch(epoch)  # what the trainer calls each epoch
        shards.append([b.tolist() for b in shard])
    return shards


def _mixed_lengths(n_image: int, n_text: int) -> list[int]:
    import random

    rng = random.Random(0)
    return [rng.randint(20, 90) for _ in range(n_image)] + [-rng.randint(5, 60) for _ in range(n_text)]


@pytest.mark.parametrize("batch, accum, world", [(2, 1, 2), (2, 2, 2), (3, 1, 4)])
def test_ranks_read_disjoint_shares_that_cover_each_epoch(batch, accum, world):
    per_step = batch * accum * world
    lengths = _mixed_lengths(4 * per_step, 2 * per_step)  # whole megabatches of each modality
    epochs = []
    for epoch in (0, 1):
        shards = _rank_batches(lengths, batch, accum, world, epoch)
        seen = [i for shard in shards for b in shard for i in b]
        assert sorted(seen) == list(range(len(lengths)))  # disjoint, and nothing missed
        steps = len(shards[0]) // accum
        for s in range(steps):
            # One optimizer step takes accum batches from every rank: together, one megabatch,
            # and every batch holds a single modality.
            step_batches = [b for shard in shards for b in shard[s * accum : (s + 1) * accum]]
            assert len({i for b in step_batches for i in b}) == per_step
            assert all(len({lengths[i] > 0 for i in b}) == 1 for b in step_batches)
        epochs.append(shards)
    assert epochs[0] != epochs[1]  # reshuffled each epoch, on every rank alike


def test_uneven_epoch_reaches_every_sample_and_repeats_only_to_fill_the_last_step():
    batch, world = 2, 2
    lengths = _mixed_lengths(13, 8)  # 21 samples: the last batch of rank 1 is filled from the start
    shards = _rank_batches(lengths, batch, 1, world, 0)
    seen = [i for shard in shards for b in shard for i in b]
    assert set(seen) == set(range(len(lengths)))
    assert len(shards[0]) == len(shards[1])  # no rank waits for another at the end of the epoch
    assert len(seen) - len(lengths) < batch * world
