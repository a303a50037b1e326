"""The launcher configs under configs/: read by accelerate's own launcher code, and what lora-llava makes of them.

These tests stop where the launch would start processes (test_engines.py
launches them): the YAML is what `accelerate launch` accepts, the variables
it would export build accelerate's DeepSpeed / FSDP plugins, the DeepSpeed
JSON files resolve from any folder and take the recipe's batch settings, and
lora-llava refuses the combinations that cannot train.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from lora_llava import distributed
from lora_llava.errors import LoraLlavaError
from lora_llava.recipe.parse import parse_recipe
from tests.helpers import ROOT, recipe_dict, run_cli, write_recipe

CONFIGS = ROOT / "configs"  # links to the package data, lora_llava/configs
YAMLS = sorted(CONFIGS.glob("*.yaml"))
JSONS = sorted(CONFIGS.glob("*.json"))


def launcher_env(config: Path) -> dict[str, str]:
    """The variables `accelerate launch --config_file CONFIG -m lora_llava train r.yaml` gives each process."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser
    from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

    args = launch_command_parser().parse_args(["--config_file", str(config), "-m", "lora_llava", "train", "r.yaml"])
    args, defaults, _ = _validate_launch_command(args)
    if args.use_deepspeed:
        args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)  # as accelerate's launch_command does
        _, env = prepare_deepspeed_cmd_env(args)
    else:
        env = prepare_multi_gpu_env(args)
    return {k: v for k, v in env.items() if k.startswith(("ACCELERATE_", "FSDP_"))}


@pytest.fixture
def launched(monkeypatch, tmp_path):
    """Set a config's launcher variables in this process, as if accelerate had started it in a folder that is not the repository."""

    def apply(name: str) -> dict[str, str]:
        for key in list(os.environ):
            if key.startswith(("ACCELERATE_", "FSDP_")):
                monkeypatch.delenv(key)
        env = launcher_env(CONFIGS / f"{name}.yaml")
        for k, v in env.items():
            monkeypatch.setenv(k, v)
        monkeypatch.chdir(tmp_path)  # the YAMLs name their JSON relative to the repository root
        return env

    return apply


def test_every_shipped_config_is_yaml_or_json_and_package_data():
    import tomllib

    assert CONFIGS.resolve() == distributed.CONFIGS  # what a pip install ships is what the repository has
    package_data = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["lora_llava"]
    assert {"configs/*.yaml", "configs/*.json"} <= set(package_data)
    assert {p.name for p in CONFIGS.iterdir()} == {p.name for p in YAMLS + JSONS}
    assert {p.stem for p in YAMLS} >= {"ddp", "zero2", "zero3", "fsdp", "fsdp_qlora"}
    for p in JSONS:
        json.loads(p.read_text())


@pytest.mark.parametrize("config", YAMLS, ids=lambda p: p.name)
def test_accelerate_launch_accepts_the_config(config):
    from accelerate.commands.config.config_args import ClusterConfig
    from accelerate.commands.launch import launch_command_parser

    first = config.read_text().splitlines()[0]
    assert first.startswith(f"# accelerate launch --config_file configs/{config.name} -m lora_llava train"), first
    cluster = ClusterConfig.from_yaml_file(str(config))  # raises on keys accelerate does not know
    launch_args = vars(launch_command_parser().parse_args(["x.py"]))
    raw = yaml.safe_load(config.read_text())
    for section in ("deepspeed_config", "fsdp_config"):
        for key in raw.get(section) or {}:
            assert key in launch_args, f"{config.name}: {section}.{key} is not an accelerate launch option"
    assert cluster.num_machines == 1 and cluster.machine_rank == 0
    env = launcher_env(config)
    assert env["ACCELERATE_MIXED_PRECISION"] == "no"  # the recipe's dtype decides


@pytest.mark.parametrize("name, stage", [("zero2", 2), ("zero3", 3)])
def test_deepspeed_configs_resolve_and_build_accelerates_plugin(launched, name, stage):
    from accelerate.utils import DeepSpeedPlugin

    env = launched(name)
    assert env["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == f"configs/{name}.json"  # as written: not found from here
    assert distributed.zero_stage() == stage
    distributed.use_deepspeed_config()  # what `lora-llava train` does first
    json_path = Path(os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"])
    assert json_path == distributed.CONFIGS / f"{name}.json"
    plugin = DeepSpeedPlugin()  # reads the variables and the JSON, as the trainer will
    assert plugin.zero_stage == stage == distributed.zero_stage()
    config = json.loads(json_path.read_text())
    assert "optimizer" not in config and "scheduler" not in config  # lora-llava's two learning rates and schedule
    assert config["zero_allow_untested_optimizer"] is True  # bitsandbytes' 8-bit AdamW is a client optimizer
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


def test_a_deepspeed_json_in_the_launch_folder_wins_and_a_missing_one_is_named(launched, tmp_path, monkeypatch):
    launched("zero2")
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "zero2.json").write_text(json.dumps({"zero_optimization": {"stage": 1}}))  # a user's edit
    assert distributed.zero_stage() == 1
    distributed.use_deepspeed_config()
    assert os.environ["ACCELERATE_DEEPSPEED_CONFIG_FILE"] == str(tmp_path / "configs" / "zero2.json")
    for missing in ("my/zero2.json", "configs/zero4.json"):
        monkeypatch.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", missing)
        with pytest.raises(LoraLlavaError, match=rf"{missing} is not a file \(from .*\); the shipped ones: configs/zero2.json"):
            distributed.use_deepspeed_config()


@pytest.mark.parametrize("json_name", [p.name for p in JSONS])
def test_deepspeed_takes_batch_settings_from_the_recipe(json_name, tiny_model, shapes, tmp_path):
    """`auto` values are filled by transformers from the TrainingArguments the recipe makes: the recipe keeps its meaning."""
    from lora_llava.training.run import training_arguments

    c = json.loads((CONFIGS / json_name).read_text())
    for key in ("train_micro_batch_size_per_gpu", "train_batch_size", "gradient_accumulation_steps", "gradient_clipping"):
        assert c[key] == "auto", key
    assert c["bf16"]["enabled"] == c["fp16"]["enabled"] == "auto"
    recipe = parse_recipe(
        recipe_dict(tiny_model, shapes, tmp_path / "r", train={"batch_size": 3, "grad_accum": 5, "max_grad_norm": 0.5})
    )
    args = training_arguments(recipe, tmp_path / "r", False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.max_grad_norm) == (3, 5, 0.5)


@pytest.mark.parametrize("name", ["fsdp", "fsdp_qlora"])
def test_fsdp_configs_build_accelerates_plugin(launched, name):
    from accelerate.utils import FullyShardedDataParallelPlugin

    launched(name)
    plugin = FullyShardedDataParallelPlugin()  # reads the FSDP_* variables, as the trainer will
    assert distributed.fsdp_enabled()
    assert plugin.fsdp_version == 1 and plugin.use_orig_params is False
    assert "SHARDED_STATE_DICT" in str(plugin.state_dict_type)
    assert plugin.activation_checkpointing is False  # the recipe's gradient checkpointing is the one in use


def _recipe(tiny_model, shapes, tmp_path, quantization="none", stage="instruct"):
    raw = recipe_dict(tiny_model, shapes, tmp_path / "r", model={"quantization": quantization, "dtype": "bfloat16"})
    if stage == "align":
        raw.update(stage="align", model={"name_or_path": str(tiny_model), "dtype": "bfloat16"})
        raw["data"]["template"] = "plain"
    return parse_recipe(raw)


@pytest.mark.parametrize(
    "name, quantization, stage, refused",
    [
        ("ddp", "nf4", "instruct", None),
        ("ddp", "int8", "instruct", None),
        ("ddp", "none", "align", None),
        ("zero2", "nf4", "instruct", None),
        ("zero2", "none", "align", None),
        ("zero3", "none", "instruct", None),
        ("zero3", "nf4", "instruct", "model.quantization: nf4 cannot be trained under DeepSpeed ZeRO-3"),
        ("zero3", "int8", "instruct", "model.quantization: int8 cannot be trained under DeepSpeed ZeRO-3"),
        ("zero3", "none", "align", "stage: align trains only the projector"),
        ("fsdp", "none", "instruct", None),
        ("fsdp_qlora", "nf4", "instruct", None),
        ("fsdp_qlora", "int8", "instruct", "model.quantization: int8 weights cannot be sharded by FSDP"),
        ("fsdp", "none", "align", "stage: align trains only the projector"),
    ],
)
def test_what_each_launcher_config_can_train(launched, tiny_model, shapes, tmp_path, name, quantization, stage, refused):
    launched(name)
    recipe = _recipe(tiny_model, shapes, tmp_path, quantization, stage)
    if refused is None:
        distributed.check_engine(recipe)
    else:
        with pytest.raises(LoraLlavaError, match=refused) as e:
            distributed.check_engine(recipe)
        assert "\n" not in str(e.value)


@pytest.mark.parametrize("name, storage", [("fsdp_qlora", torch.bfloat16), ("ddp", torch.uint8), ("zero2", torch.uint8)])
def test_4bit_weights_are_stored_in_the_model_dtype_under_fsdp(launched, tiny_model, shapes, tmp_path, name, storage):
    from lora_llava.model.load import quantization_config

    launched(name)
    q = quantization_config(_recipe(tiny_model, shapes, tmp_path, "nf4").model, torch.bfloat16)
    assert q.bnb_4bit_quant_storage == storage


def test_cli_refuses_zero3_with_4bit_in_one_line_naming_the_rank(tiny_model, shapes, tmp_path, monkeypatch):
    env = launcher_env(CONFIGS / "zero3.yaml")
    for k, v in {**env, "WORLD_SIZE": "2", "RANK": "1"}.items():
        monkeypatch.setenv(k, v)
    out = tmp_path / "run"
    recipe = write_recipe(tmp_path / "recipe.yaml", recipe_dict(tiny_model, shapes, out, model={"quantization": "nf4"}))
    result = run_cli("train", str(recipe), cwd=tmp_path)  # the JSON resolves from any folder
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "[rank 1] lora-llava train: error: model.quantization: nf4 cannot be trained"
    ), lines
    assert "configs/zero2.yaml" in lines[0] and "configs/fsdp_qlora.yaml" in lines[0]
    assert not out.exists()


def test_readme_gives_the_launch_command_of_every_config_and_multi_node_flags():
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Several GPUs", 1)[1].split("\n## ", 1)[0]
    for config in YAMLS:
        assert f"--config_file configs/{config.name}" in section, config.name
    assert "torchrun --nproc_per_node" in section
    for flag in ("--num_machines", "--machine_rank", "--main_process_ip", "--main_process_port", "--nnodes", "--rdzv_endpoint"):
        assert flag in section, flag
