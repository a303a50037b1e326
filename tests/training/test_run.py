"""`lora-llava train`: what trains, what stays frozen, what a run folder holds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import ROOT, run_cli, run_main

LLM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _medical_overrides(tiny_model: Path, shapes: Path, out: Path) -> list[str]:
    return [
        f"model.name_or_path={tiny_model}",
        f"data.train.0.path={shapes / 'train.json'}",
        f"data.train.0.image_folder={shapes / 'images'}",
        "data.eval=[]",
        "lora.r=16",  # the tiny model's layers are 64 wide: rank 128 is refused there
        "train.max_steps=3",
        "train.batch_size=4",
        "projector.learning_rate=1e-2",
        "train.learning_rate=1e-2",
        f"train.output_dir={out}",
    ]


@pytest.fixture(scope="module")
def medical_qlora(tmp_path_factory, tiny_model, shapes):
    """recipes/medical.yaml (QLoRA nf4) run on the tiny model through the CLI, as the README shows."""
    out = tmp_path_factory.mktemp("medical") / "run"
    result = run_cli("train", str(ROOT / "recipes/medical.yaml"), *_medical_overrides(tiny_model, shapes, out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_medical_recipe_runs_qlora_and_writes_run_folder(medical_qlora):
    out, result = medical_qlora
    for name in ("adapter_config.json", "adapter_model.safetensors", "recipe.yaml", "metrics.jsonl", "loss.png"):
        assert (out / name).is_file(), name
    assert "trainable parameters:" in result.stdout and "LoRA" in result.stdout and "projector" in result.stdout
    # A captured log: one progress line per logged step, neither tqdm's redraws nor raw dicts.
    progress = [line for line in result.stderr.splitlines() if line.startswith("step ") and " loss " in line]
    assert [line.split()[1] for line in progress] == ["1/3", "2/3", "3/3"], result.stderr[-2000:]
    assert "/3 [" not in result.stderr and "{'loss'" not in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 16 and config["lora_alpha"] == 256
    assert config["modules_to_save"] == ["multi_modal_projector"]


def test_adapter_holds_lora_on_llm_linears_and_the_projector(medical_qlora, tiny_model):
    out, _ = medical_qlora
    state = load_file(str(out / "adapter_model.safetensors"))
    lora_keys = [k for k in state if "lora_" in k]
    assert lora_keys and all("language_model.layers." in k for k in lora_keys)
    assert {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in lora_keys} == LLM_LINEARS
    proj = {k: v for k, v in state.items() if "multi_modal_projector" in k}
    assert len(proj) == 4  # linear_1/2 weight + bias
    base = load_file(str(tiny_model / "model.safetensors"))
    for k, v in proj.items():
        name = "multi_modal_projector." + k.split("multi_modal_projector.")[1]
        assert not torch.allclose(v.float(), base[name].float()), f"projector {name} did not train"


@pytest.mark.parametrize("family", ["llava", "llava_next"])
def test_qlora_parameters_change_exactly_where_they_should(family, request, shapes, tmp_path):
    """Under QLoRA: LoRA, projector (and NeXT's image_newline) change; CLIP, lm_head, embeddings and base LLM weights do not."""
    tiny_model = request.getfixturevalue("tiny_next" if family == "llava_next" else "tiny_model")
    import bitsandbytes as bnb

    from lora_llava.data.build import build_dataset
    from lora_llava.data.dataset import collate
    from lora_llava.model.build import load_for_training
    from lora_llava.model.load import quantized_module_names
    from lora_llava.recipe.parse import load_recipe
    from lora_llava.training.lora import setup_instruct
    from lora_llava.training.run import training_arguments

    recipe = load_recipe(ROOT / "recipes/medical.yaml", _medical_overrides(tiny_model, shapes, tmp_path / "run"))
    model, processor = load_for_training(recipe)
    quantized = quantized_module_names(model)
    expected = {
        n
        for n, m in model.named_modules()
        if n.startswith("model.language_model.layers.") and n.rsplit(".", 1)[-1] in LLM_LINEARS
    }
    assert quantized == expected  # the 4-bit layers are exactly the LLM's linear layers
    assert model.lm_head.weight.dtype == torch.bfloat16
    assert next(model.model.vision_tower.parameters()).dtype == torch.bfloat16
    assert model.model.multi_modal_projector.linear_1.weight.dtype == torch.bfloat16

    model = setup_instruct(model, recipe)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ds = build_dataset(recipe, processor)
    batch = collate([ds[i] for i in range(4)], processor.tokenizer.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p.detach())}
    lora_b = {n for n in before if "lora_B" in n}
    assert lora_b <= changed
    assert {n for n in before if "modules_to_save" in n} <= changed
    newline = {n for n in before if n.endswith("image_newline")}
    assert len(newline) == (family == "llava_next") and newline <= changed  # a parameter, trained with the projector
    frozen = {n for n in before if "vision_tower" in n or "lm_head" in n or "embed_tokens" in n or "original_module" in n}
    frozen |= {n for n in before if "language_model" in n and "lora_" not in n}
    assert frozen and not (frozen & changed)
    assert all(isinstance(m, bnb.nn.Linear4bit) for n, m in model.named_modules() if n.endswith("q_proj.base_layer"))
    assert training_arguments(recipe, tmp_path, False).bf16


def test_lora_targets_never_hit_clip_projector_or_lm_head(lora_run):
    state = load_file(str(lora_run / "adapter_model.safetensors"))
    assert not any("vision_tower" in k and "lora_" in k for k in state)
    assert not any("lm_head" in k for k in state)
    assert not any("multi_modal_projector" in k and "lora_" in k for k in state)


def test_two_learning_rates_are_separate_parameter_groups(tiny_model, shapes, tmp_path):
    from lora_llava.model.build import load_for_training
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.lora import param_groups, setup_instruct
    from tests.helpers import recipe_dict

    recipe = parse_recipe(
        recipe_dict(tiny_model, shapes, tmp_path / "r", projector={"learning_rate": 2e-5}, train={"learning_rate": 2e-4})
    )
    model, _ = load_for_training(recipe)
    groups = {g["name"]: g for g in param_groups(setup_instruct(model, recipe), recipe)}
    assert groups["lora"]["lr"] == 2e-4 and groups["projector"]["lr"] == 2e-5
    assert all(p.dtype == torch.float32 for g in groups.values() for p in g["params"])


def test_peft_loads_the_adapter(lora_run, tiny_model):
    from peft import PeftModel
    from transformers import LlavaForConditionalGeneration

    base = LlavaForConditionalGeneration.from_pretrained(tiny_model)
    model = PeftModel.from_pretrained(base, lora_run)
    trained = load_file(str(lora_run / "adapter_model.safetensors"))
    key = next(k for k in trained if "multi_modal_projector" in k and k.endswith("linear_1.weight"))
    live = dict(model.named_parameters())
    match = [n for n in live if n.endswith("modules_to_save.default.linear_1.weight")]
    assert match and torch.equal(live[match[0]].detach(), trained[key])


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.lerning_rate=1e-4", "train.lerning_rate: unknown key (did you mean train.learning_rate?)"),
        ("train.batch_size=many", "train.batch_size: expected an integer, got 'many'"),
        ("model.quantization=nf5", "model.quantization: 'nf5' is not one of"),
        ("model.name_or_path=/no/such/model", "model.name_or_path: model folder /no/such/model not found"),
        ("data.train.0.path=/no/such/train.json", "/no/such/train.json: data file not found"),
    ],
)
def test_bad_recipe_gives_one_line_exit_2_and_writes_nothing(tiny_model, shapes, tmp_path, override, message):
    out = tmp_path / "out"
    args = _medical_overrides(tiny_model, shapes, out) + [override]
    result = run_main("train", str(ROOT / "recipes/medical.yaml"), *args)  # the console script's path, in this process
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not out.exists()


def test_all_problems_of_a_recipe_are_reported_at_once(tmp_path):
    from lora_llava.errors import RecipeError
    from lora_llava.recipe.parse import load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(ROOT / "recipes/medical.yaml", ["lora.rank=4", "train.epochs=-1", "data.template=vicuna"])
    text = str(e.value)
    assert "lora.rank: unknown key (did you mean lora.r?)" in text
    assert "train.epochs: must be greater than 0" in text
    assert "data.template: 'vicuna' is not one of" in text and "did you mean 'vicuna_v1'" in text
    assert all(line.startswith(str(ROOT / "recipes/medical.yaml")) for line in text.splitlines())
