"""Lean QLoRA memory, the 8-bit / paged optimizers, and `lora-llava estimate` checked against what the CPU can measure.

What is measurable here and tested exactly: the bytes of every weight, trained
parameter and optimizer state of the tiny model, and the activations each
decoder layer saves for the backward pass (counted through autograd's
saved-tensor hooks). What the CPU cannot show (CUDA's allocator, kernels'
scratch buffers) is left to benchmarks/gpu_qlora.py.
"""

from __future__ import annotations

import re

import bitsandbytes as bnb
import pytest
import torch

from lora_llava.memory.estimate import adam_state_bytes, estimate, layer_activation_bytes, weight_parts
from lora_llava.memory.fit import cheapest_fit
from lora_llava.memory.shapes import GiB, model_shape
from lora_llava.recipe.parse import load_recipe, parse_recipe
from tests.helpers import ROOT, recipe_dict, run_cli

LLM_LINEARS = {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}


def _recipe(tiny_model, shapes, tmp_path, quantized: bool, **sections):
    model = {"quantization": "nf4", "dtype": "bfloat16"} if quantized else {}
    return parse_recipe(recipe_dict(tiny_model, shapes, tmp_path / "run", model=model, **sections))


def _setup(recipe):
    from lora_llava.model.load import load_model
    from lora_llava.training.lora import setup_instruct

    torch.manual_seed(0)
    return setup_instruct(load_model(recipe.model), recipe)


def _part_of(name: str, p: torch.Tensor) -> str:
    if ".lora_" in name:
        return "lora"
    if p.dtype == torch.uint8 or re.search(r"language_model\.layers\.\d+\.(self_attn|mlp)\.", name):
        return "llm"
    if "multi_modal_projector" in name:
        return "projector" if "modules_to_save" in name else "projector_frozen"
    return "vision" if "vision_tower" in name else "embeddings"


def _measured_weight_bytes(model) -> dict[str, int]:
    """Bytes per part of every tensor the model holds, 4-bit quantization statistics included."""
    seen: dict[int, tuple[str, int]] = {}

    def add(t: torch.Tensor, part: str) -> None:
        seen.setdefault(t.untyped_storage().data_ptr(), (part, t.untyped_storage().nbytes()))

    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            qs = module.weight.quant_state
            for t in (module.weight, qs.absmax, qs.code, qs.offset, qs.state2.absmax, qs.state2.code):
                add(t, "llm")
    for name, p in model.named_parameters():
        add(p, _part_of(name, p))
    totals: dict[str, int] = {}
    for part, nbytes in seen.values():
        totals[part] = totals.get(part, 0) + nbytes
    return totals


@pytest.mark.parametrize("quantized", [True, False], ids=["qlora", "lora"])
def test_weight_and_trained_bytes_are_exact(tiny_model, shapes, tmp_path, quantized):
    recipe = _recipe(tiny_model, shapes, tmp_path, quantized)
    measured = _measured_weight_bytes(_setup(recipe))
    predicted = {p.key: p.bytes for p in weight_parts(model_shape(recipe.model), recipe) if p.key != "optimizer"}
    assert predicted == measured


def test_lean_qlora_keeps_frozen_modules_16bit_and_trained_ones_fp32(tiny_model, shapes, tmp_path):
    """No blanket fp32 upcast: CLIP, embeddings, norms, lm_head stay bf16; only LoRA and the projector copy are fp32."""
    model = _setup(_recipe(tiny_model, shapes, tmp_path, quantized=True))
    dtypes = {name: p.dtype for name, p in model.named_parameters()}
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all(dtypes[n] == torch.float32 for n in trained)
    frozen_16bit = {n for n in dtypes if n not in trained and dtypes[n] != torch.uint8}
    assert any("vision_tower" in n for n in frozen_16bit) and any("lm_head" in n for n in frozen_16bit)
    assert any("embed_tokens" in n for n in frozen_16bit) and any("original_module" in n for n in frozen_16bit)
    assert all(dtypes[n] == torch.bfloat16 for n in frozen_16bit)
    # the 4-bit layers are exactly the base layers of the LoRA-wrapped linears of the language model
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    llm = {
        n + ".base_layer"
        for n, _ in model.named_modules()
        if re.search(r"language_model\.layers\.\d+\.(self_attn|mlp)\.\w+_proj$", n)
    }
    assert four_bit == llm and {n.split(".")[-2] for n in four_bit} == LLM_LINEARS


def test_lean_qlora_matches_peft_kbit_preparation(tiny_model, shapes, tmp_path):
    """The same loss and gradients as peft's prepare_model_for_kbit_training (fp32 frozen parts), in less memory."""
    from peft import prepare_model_for_kbit_training

    from lora_llava.data.build import build_dataset
    from lora_llava.data.dataset import collate
    from lora_llava.model.build import load_for_training
    from lora_llava.model.load import load_model
    from lora_llava.training.lora import setup_instruct

    recipe = _recipe(tiny_model, shapes, tmp_path, quantized=True)
    _, processor = load_for_training(recipe)
    ds = build_dataset(recipe, processor)
    batch = collate([ds[i] for i in range(4)], processor.tokenizer.pad_token_id)
    results = []
    for prepare in (False, True):
        model = load_model(recipe.model)
        if prepare:
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
        torch.manual_seed(0)
        model = setup_instruct(model, recipe)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(std=0.02, generator=torch.Generator().manual_seed(len(n)))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = model(**batch).loss
        loss.backward()
        grads = {n: p.grad.float() for n, p in model.named_parameters() if p.requires_grad}
        frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
        results.append((loss.item(), grads, frozen))
    (lean_loss, lean, lean_bytes), (peft_loss, upcast, peft_bytes) = results
    assert lean_loss == pytest.approx(peft_loss, rel=2e-2)
    for name in lean:
        cos = torch.nn.functional.cosine_similarity(lean[name].flatten(), upcast[name].flatten(), dim=0)
        assert cos > 0.98, name
    assert lean_bytes < 0.75 * peft_bytes  # the frozen 16-bit parts are half the size


@pytest.mark.parametrize("optimizer", ["adamw", "adamw_8bit", "paged_adamw_8bit", "paged_adamw"])
def test_optimizers_train_on_cpu_and_their_states_have_the_predicted_size(tiny_model, shapes, tmp_path, optimizer):
    from lora_llava.data.build import build_dataset
    from lora_llava.data.dataset import collate
    from lora_llava.model.build import load_for_training
    from lora_llava.training.lora import param_groups
    from lora_llava.training.trainer import build_optimizer

    recipe = _recipe(tiny_model, shapes, tmp_path, quantized=False, train={"optimizer": optimizer})
    model = _setup(recipe)
    _, processor = load_for_training(recipe)
    ds = build_dataset(recipe, processor)
    batch = collate([ds[i] for i in range(4)], processor.tokenizer.pad_token_id)
    opt = build_optimizer(param_groups(model, recipe), optimizer)
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    before = {n: p.detach().clone() for n, p in trained.items()}
    losses = []
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert all(not torch.equal(before[n], p.detach()) for n, p in trained.items() if "lora_A" not in n)
    assert losses[-1] < losses[0]
    states = {
        t.untyped_storage().data_ptr(): t.untyped_storage().nbytes()
        for s in opt.state.values()
        for t in s.values()
        if torch.is_tensor(t)
    }
    assert sum(states.values()) == adam_state_bytes([p.numel() for p in trained.values()], optimizer)
    if "8bit" in optimizer:
        big = max(trained.values(), key=lambda p: p.numel())
        assert big.numel() >= 4096 and opt.state[big]["state1"].dtype == torch.uint8


def _saved_bytes_per_layer(model, batch, autocast: bool) -> list[int]:
    """Bytes of new tensors (not parameters) each decoder layer saves for backward, counted by autograd's hooks."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    layers = model.get_base_model().model.language_model.layers
    seen: set[int] = set()
    counts = [0] * len(layers)
    handles, contexts = [], {}

    def pack_into(i):
        def pack(t):
            key = t.untyped_storage().data_ptr()
            if key not in params and key not in seen:
                seen.add(key)
                counts[i] += t.untyped_storage().nbytes()
            return t

        return pack

    for i, layer in enumerate(layers):
        contexts[i] = torch.autograd.graph.saved_tensors_hooks(pack_into(i), lambda t: t)
        handles.append(layer.register_forward_pre_hook(lambda _m, _a, i=i: contexts[i].__enter__()))
        handles.append(layer.register_forward_hook(lambda _m, _a, _o, i=i: contexts[i].__exit__(None, None, None)))
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            model(**batch)
    finally:
        for h in handles:
            h.remove()
    return counts


@pytest.mark.parametrize(
    ("quantized", "dropout"), [(False, 0.05), (True, 0.05), (False, 0.0)], ids=["lora", "qlora", "no-dropout"]
)
def test_saved_activations_per_layer_match_the_formula(tiny_model, shapes, tmp_path, quantized, dropout):
    """Without checkpointing each decoder layer keeps what the formula says, to the byte or nearly."""
    tokens = 96
    recipe = _recipe(
        tiny_model, shapes, tmp_path, quantized, lora={"dropout": dropout}, data={"max_length": tokens}, train={"batch_size": 1}
    )
    model = _setup(recipe)
    model.train()
    image = model.config.image_token_id
    ids = torch.randint(3, 500, (1, tokens), generator=torch.Generator().manual_seed(0))
    ids[0, 0], ids[0, 1:17] = 1, image
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "pixel_values": torch.randn(1, 3, 56, 56), "labels": ids}
    measured = _saved_bytes_per_layer(model, batch, autocast=quantized)
    predicted = layer_activation_bytes(model_shape(recipe.model), recipe, tokens, device="cpu")
    # layer 0 also saves the rotary cos/sin that every layer shares; later layers hold only their own tensors
    assert measured[1] == pytest.approx(predicted, rel=0.01)
    assert measured[0] >= measured[1]


def test_estimate_for_medical_runs_offline_and_fits_24gib(tmp_path):
    """`estimate recipes/medical.yaml`: no weights, no network; it fits a 24 GiB card, or names the changes that make it fit."""
    result = run_cli("estimate", str(ROOT / "recipes/medical.yaml"), "--gpu-memory", "24GiB", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "llava-hf/llava-1.5-13b-hf (built-in shape)" in out and "NF4 + double quant" in out
    changes = re.search(r"^cheapest changes that fit \(([\d.]+) GiB\): (.+)$", out, re.M)
    if changes:  # the recipe as written does not fit: the suggestion must, through the same command
        assert "does not fit" in out
        result = run_cli("estimate", str(ROOT / "recipes/medical.yaml"), *changes.group(2).split(), cwd=tmp_path, timeout=120)
        assert result.returncode == 0, result.stderr
        out = result.stdout
    total = float(re.search(r"^total: ([\d.]+) GiB$", out, re.M).group(1))
    assert total < 24 and "fits: 24.0 GiB card" in out
    assert 10 < total < 20  # in line with the first-principles budget (lean ~14 GiB allocated)


def test_estimate_orders_the_lean_options(tmp_path):
    """Every lean option lowers the estimate; the suggestions are the cheapest that fit."""
    base = load_recipe(ROOT / "recipes/medical.yaml", ["train.batch_size=1", "train.loss=standard", "train.optimizer=adamw"])
    shape = model_shape(base.model)
    total = estimate(base, shape).total

    def with_(*overrides):
        return estimate(
            load_recipe(
                ROOT / "recipes/medical.yaml", ["train.batch_size=1", "train.loss=standard", "train.optimizer=adamw", *overrides]
            ),
            shape,
        ).total

    assert with_("train.optimizer=adamw_8bit") < total
    assert with_("train.gradient_checkpointing=false") > total + 10 * GiB  # activations of 40 layers
    assert with_("lora.r=64") < total
    assert with_("model.quantization=none") > total + 15 * GiB
    # the logits of 8 samples, in one step without accumulation: there the end of the forward pass is the peak
    eight = ("train.batch_size=8", "train.grad_accum=1")
    assert with_(*eight) > with_(*eight, "train.loss=chunked")
    budget = with_("train.optimizer=adamw_8bit") + 0.1 * GiB  # 8-bit states fit, fp32 ones do not
    assert total > budget
    changes, fitted = cheapest_fit(base, shape, budget=budget)
    assert changes == ["train.optimizer=adamw_8bit"] and fitted.total <= budget
    assert cheapest_fit(base, shape, budget=4 * GiB) is None


def test_accumulated_gradients_stay_through_every_backward_pass():
    """From the second micro-batch of an accumulating step on, all gradients are allocated when backward starts.

    benchmarks/simulate_step.py tracks it on the 13B step: the second micro-batch's
    backward peak is higher than the first's by the gradients already there.
    """
    base = load_recipe(ROOT / "recipes/medical.yaml", ["train.grad_accum=1"])
    accumulating = load_recipe(ROOT / "recipes/medical.yaml", ["train.grad_accum=16"])
    shape = model_shape(base.model)
    one, many = estimate(base, shape), estimate(accumulating, shape)
    trained = sum(p.bytes for p in many.parts if p.key in ("lora", "projector"))
    # As tracked: the second micro-batch's forward pass peaks in its last layer, holding autocast's LoRA copies
    # of every checkpointed layer beside the gradients of the first.
    assert many.moment == "forward pass, last decoder layer"
    parts = {p.key: p.bytes for p in many.parts}
    assert parts["grads"] == trained  # fp32 gradients of every trained parameter
    assert parts["copies"] == 40 * 2 * sum(p.bytes for p in many.parts if p.key == "lora") / 4 / 40
    assert many.allocated > one.allocated


@pytest.mark.parametrize(
    "args, message",
    [
        (["--gpu-memory", "lots"], "--gpu-memory: 'lots' is not a memory size"),
        (["model.name_or_path=/no/such/model"], "model.name_or_path: /no/such/model has no local config.json"),
        (["train.lerning_rate=1"], "train.lerning_rate: unknown key"),
    ],
)
def test_estimate_errors_are_one_line(args, message, capsys):
    from lora_llava.cli import main

    assert main(["estimate", str(ROOT / "recipes/medical.yaml"), *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_estimate_reads_a_local_config(tiny_model, shapes, tmp_path):
    recipe = _recipe(tiny_model, shapes, tmp_path, quantized=True)
    shape = model_shape(recipe.model)
    assert (shape.hidden, shape.layers, shape.image_tokens) == (64, 2, 16)
    assert estimate(recipe, shape).total < 1 * GiB


def test_estimate_composes_the_shape_of_two_parts(tmp_path):
    """CLIP-L/336 + a 7B LLaMA config compose to llava-1.5-7b's shape (two tokens added, vocabulary padded to 64)."""
    import json

    from lora_llava.memory.shapes import BUILTIN_SHAPES
    from lora_llava.recipe.schema import ModelConfig

    clip = {
        "hidden_size": 1024,
        "intermediate_size": 4096,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "image_size": 336,
        "patch_size": 14,
    }
    llama = {
        "model_type": "llama",
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "vocab_size": 32000,
    }
    for name, config in (("clip", {"model_type": "clip", "vision_config": clip}), ("llm", llama)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text(json.dumps(config))
    shape = model_shape(ModelConfig(vision_tower=str(tmp_path / "clip"), language_model=str(tmp_path / "llm")))
    assert shape.__class__(**{**shape.__dict__, "source": ""}) == BUILTIN_SHAPES["llava-hf/llava-1.5-7b-hf"]


def test_next_shapes_count_the_worst_image_of_their_grid(tiny_next, tiny_model, shapes, tmp_path):
    """2,928 image tokens for LLaVA-NeXT at 336 px: 576 global + a full 2 x 2 grid (2,304) + 48 row newlines."""
    from lora_llava.data.encode import anyres_worst_case
    from lora_llava.model.load import load_processor

    for name in ("llava-hf/llava-v1.6-vicuna-13b-hf", "llava-hf/llava-v1.6-mistral-7b-hf"):
        shape = model_shape(load_recipe("next_7b_lora", [f"model.name_or_path={name}"]).model)
        assert (shape.image_tokens, shape.vision_tokens) == (2928, 5 * 576)
    local = model_shape(_recipe(tiny_next, shapes, tmp_path, quantized=True).model)
    assert local.image_tokens == anyres_worst_case(load_processor(str(tiny_next)))  # the data pipeline's own count
    hd = model_shape(parse_recipe(recipe_dict(tiny_model, shapes, tmp_path, model={"name_or_path": str(tiny_model), "anyres": True}), "t").model)
    assert hd.image_tokens == local.image_tokens  # LLaVA-1.5-HD of the same tower: the same grid in tiles


def test_estimate_says_whether_next_13b_qlora_fits_24gib_at_4096(tmp_path):
    result = run_cli("estimate", "hd_from_llava15", "model.anyres=false", "model.image_grid_pinpoints=null",
                     "model.name_or_path=llava-hf/llava-v1.6-vicuna-13b-hf", "--gpu-memory", "24GiB", cwd=tmp_path, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "2928 image tokens per sample, the worst case of the AnyRes grid" in result.stdout
    assert "batch 1 x 4096 tokens" in result.stdout
    assert "fits: 24.0 GiB card" in result.stdout or "cheapest changes that fit" in result.stdout
