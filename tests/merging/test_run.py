"""`lora-llava merge`: faithful weights, a checkpoint plain transformers loads, a parity check, atomic output."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoTokenizer

import lora_llava
from lora_llava.errors import ModelError, OutputError, ParityError
from lora_llava.merging.release import text_after_image
from lora_llava.recipe.parse import load_recipe, parse_recipe
from tests.helpers import run_cli


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _leftovers(parent: Path, name: str) -> list[Path]:
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def merged(tmp_path_factory, lora_run, qlora_run):
    """Default merges (library API) of the LoRA and the QLoRA run: {name: (folder, report)}."""
    root = tmp_path_factory.mktemp("merged")
    return {name: (root / name, lora_llava.merge(run, root / name)) for name, run in (("lora", lora_run), ("qlora", qlora_run))}


@pytest.fixture(scope="module")
def parity_inputs(lora_run, qlora_run, tmp_path_factory):
    """A few encoded training samples of the tiny runs, and each adapter model's logits on them (as trained)."""
    from transformers import AutoProcessor

    from lora_llava.merging.parity import load_trained_model, logits_of, parity_batches

    recipe = load_recipe(qlora_run / "recipe.yaml")
    batches, _ = parity_batches(recipe, AutoProcessor.from_pretrained(qlora_run), 3, tmp_path_factory.mktemp("parity"))
    reference = {}
    for name, run in (("lora", lora_run), ("qlora", qlora_run)):
        r = load_recipe(run / "recipe.yaml")
        reference[name] = logits_of(lambda r=r, run=run: load_trained_model(r, r.model.name_or_path, run, None), batches)
    return batches, reference


@pytest.mark.parametrize("quantization, dtype", [("nf4", "bfloat16"), ("int8", "float32")])
def test_quantized_base_rebuild_is_bit_exact_with_the_loaded_layers(qlora_run, tiny_model, quantization, dtype):
    """The default merge rebuilds exactly the weights a QLoRA (or 8-bit) adapter was trained against."""
    import dataclasses

    import bitsandbytes.functional as bnbf

    from lora_llava.merging.weights import llm_linear, trained_base_weight
    from lora_llava.model.load import load_model, quantization_config, quantized_module_names, resolve_dtype

    cfg = dataclasses.replace(load_recipe(qlora_run / "recipe.yaml").model, quantization=quantization, dtype=dtype)
    model = load_model(cfg)
    modules = dict(model.named_modules())
    checkpoint = load_file(str(tiny_model / "model.safetensors"))
    linears = {llm_linear(k): k for k in checkpoint if llm_linear(k)}
    quantized = quantized_module_names(model)
    assert {(int(n.split(".")[3]), n.split(".")[4], n.split(".")[5]) for n in quantized} == set(linears)
    compute = resolve_dtype(cfg.dtype)
    for name in quantized:
        w = modules[name].weight
        if quantization == "nf4":
            loaded = bnbf.dequantize_4bit(w.data, w.quant_state).float()
        else:
            loaded = bnbf.int8_vectorwise_dequant(w.data, w.SCB).float()
        layer, block, linear = name.split(".")[3:6]
        original = checkpoint[linears[(int(layer), block, linear)]]
        rebuilt = trained_base_weight(original, quantization, compute, quantization_config(cfg, compute))
        assert torch.equal(rebuilt, loaded), name
        assert not torch.equal(rebuilt, original)


def test_merged_weights_are_base_plus_lora_delta_and_trained_projector(merged, lora_run, qlora_run, tiny_model, tmp_path):
    from lora_llava.merging.weights import trained_base_weight
    from lora_llava.model.load import quantization_config

    base = load_file(str(tiny_model / "model.safetensors"))
    key = "language_model.model.layers.1.mlp.down_proj.weight"
    adapter_key = "base_model.model.model.language_model.layers.1.mlp.down_proj.lora_{}.weight"
    original = lora_llava.merge(qlora_run, tmp_path / "original", merge_into="original", check=False)
    assert original.mode == "original" and original.parity is None
    nf4 = quantization_config(load_recipe(qlora_run / "recipe.yaml").model, torch.bfloat16)

    def as_trained_in_nf4(w):
        return trained_base_weight(w, "nf4", torch.bfloat16, nf4)

    def original_weight(w):
        return w.float()

    for run, folder, build in (
        (lora_run, merged["lora"][0], original_weight),
        (qlora_run, merged["qlora"][0], as_trained_in_nf4),
        (qlora_run, tmp_path / "original", original_weight),
    ):
        adapter = load_file(str(run / "adapter_model.safetensors"))
        out = _tensors(folder)
        assert set(out) == set(base)  # the base checkpoint's names: standard llava-hf keys
        delta = adapter[adapter_key.format("B")] @ adapter[adapter_key.format("A")] * (16 / 8)  # alpha / r
        expected = (build(base[key]) + delta).to(out[key].dtype)
        assert torch.equal(out[key], expected)
        assert not torch.equal(out[key].float(), base[key].to(out[key].dtype).float())
        for suffix in ("linear_1.weight", "linear_2.bias"):
            trained = adapter[f"base_model.model.model.multi_modal_projector.{suffix}"]
            assert torch.equal(out[f"multi_modal_projector.{suffix}"], trained.to(out[key].dtype))
    assert _tensors(merged["lora"][0])[key].dtype == torch.float32 and _tensors(merged["qlora"][0])[key].dtype == torch.bfloat16


def test_qlora_default_merge_is_10x_closer_than_naive_merge_and_unload(merged, qlora_run, parity_inputs):
    from lora_llava.merging.parity import compare, load_merged_model, load_trained_model, logits_of

    batches, references = parity_inputs
    reference = references["qlora"]
    recipe = load_recipe(qlora_run / "recipe.yaml")
    folder, report = merged["qlora"]
    ours = compare(
        reference, logits_of(lambda: load_merged_model(folder, torch.bfloat16, folder.parent / "off"), batches), None, 0.02, ""
    )

    def naive():  # peft's merge into the 4-bit model: re-quantizes every merged weight
        return load_trained_model(recipe, recipe.model.name_or_path, qlora_run, None).merge_and_unload()

    theirs = compare(reference, logits_of(naive, batches), None, 0.02, "")
    assert report.parity.passed and report.parity.max_abs <= report.parity.tolerance
    assert ours.max_abs * 10 <= theirs.max_abs, (ours, theirs)
    assert report.parity.max_abs * 10 <= theirs.max_abs
    assert ours.top1 >= theirs.top1


PLAIN_TRANSFORMERS = r"""
import json, sys
for name in ("peft", "lora_llava", "bitsandbytes"):
    sys.modules[name] = None  # importing any of them now fails
import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration

folder, inputs_file, image_file, out_file = sys.argv[1:]
model = LlavaForConditionalGeneration.from_pretrained(folder)
processor = AutoProcessor.from_pretrained(folder)
inputs = torch.load(inputs_file)
with torch.no_grad():
    logits = [model(**{k: v.to(model.dtype) if k == "pixel_values" else v for k, v in b.items()}).logits[0].float() for b in inputs]
messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]}]
prompt = processor.apply_chat_template(messages, add_generation_prompt=True)
enc = processor(images=Image.open(image_file), text=prompt, return_tensors="pt")
enc["pixel_values"] = enc["pixel_values"].to(model.dtype)
generated = model.generate(**enc, max_new_tokens=6, do_sample=False)
torch.save({"logits": logits, "prompt": prompt, "generated": generated[0, enc["input_ids"].shape[1]:].tolist(),
            "eos": model.generation_config.eos_token_id, "modules": sorted(m for m in sys.modules if m.split(".")[0] in ("peft", "lora_llava", "bitsandbytes") and sys.modules[m] is not None)}, out_file)
"""


@pytest.mark.parametrize("name", ["lora", "qlora"])
def test_merged_folder_loads_and_generates_with_plain_transformers(merged, name, parity_inputs, shapes, tmp_path):
    """In a process where peft, lora_llava and bitsandbytes cannot be imported: same logits, a prompt, generate."""
    folder, report = merged[name]
    batches, reference = parity_inputs
    inputs = [{k: b[k] for k in ("input_ids", "attention_mask", "pixel_values")} for b in batches]
    torch.save(inputs, tmp_path / "inputs.pt")
    image = sorted((shapes / "images").glob("*.png"))[0]
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_TRANSFORMERS)
    result = subprocess.run(
        [sys.executable, str(script), str(folder), str(tmp_path / "inputs.pt"), str(image), str(tmp_path / "out.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = torch.load(tmp_path / "out.pt")
    assert out["modules"] == []
    assert {p.name for p in folder.iterdir()} >= {
        "config.json",
        "generation_config.json",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "README.md",
        "recipe.yaml",
    }
    # The release writes "<image>" then what the training encoding puts after it (" \n" for a non-legacy tokenizer).
    after = text_after_image(AutoTokenizer.from_pretrained(folder))
    assert out["prompt"].endswith(f"USER: <image>{after}What colour is the shape? ASSISTANT:") and out["prompt"].startswith(
        "A chat between"
    )
    assert len(out["generated"]) >= 1 and out["eos"] == 2  # </s> of the tiny tokenizer
    delta = max(float((a - b).abs().max()) for a, b in zip(out["logits"], reference[name]))
    assert delta <= report.parity.tolerance
    assert delta <= {"lora": 1e-5, "qlora": 2e-2}[name]  # fp32 end to end; bf16 weights


def test_chat_template_and_processor_reproduce_the_training_encoding(merged, shapes):
    """A transformers user's prompt, token ids and pixel values are exactly what training used."""
    from PIL import Image
    from transformers import AutoProcessor

    from lora_llava.data.dataset import LlavaDataset
    from lora_llava.data.formats import Sample
    from lora_llava.data.templates import generation_prompt, render
    from lora_llava.merging.release import text_after_image
    from lora_llava.recipe.schema import DatasetSpec

    folder, _ = merged["lora"]
    processor = AutoProcessor.from_pretrained(folder)
    turns = (
        ("user", "<image>\nWhat colour is the shape?"),
        ("assistant", "red"),
        ("user", "Is there a circle?"),
        ("assistant", "no"),
    )
    messages = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What colour is the shape?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "red"}]},
        {"role": "user", "content": "Is there a circle?"},
        {"role": "assistant", "content": "no"},
    ]
    tok = processor.tokenizer
    # The text differs only where the tokenizer needs a space after `<image>` for training's ids (tests/test_fidelity.py).
    as_released = {"<image>\n": "<image>" + text_after_image(tok)}.popitem()
    assert processor.apply_chat_template(messages) == render(Sample("x", turns, ()), "vicuna_v1", tok).text.replace(*as_released)
    assert processor.apply_chat_template(messages[:3], add_generation_prompt=True) == generation_prompt(
        list(turns[:3]), "vicuna_v1", tok
    ).replace(*as_released)
    system = [{"role": "system", "content": "Answer briefly."}]
    assert processor.apply_chat_template(system + messages[:1], add_generation_prompt=True) == generation_prompt(
        list(turns[:1]), "vicuna_v1", tok, system_prompt="Answer briefly."
    ).replace(*as_released)
    ds = LlavaDataset(
        (DatasetSpec(path=str(shapes / "test.json"), image_folder=str(shapes / "images")),), processor, "vicuna_v1", 256
    )
    sample = ds.sample(0)
    enc, pixels = ds.encode_sample(sample)
    text = processor.apply_chat_template(
        [
            {
                "role": "user",
                "content": [{"type": "image"}, {"type": "text", "text": sample.turns[0][1].removeprefix("<image>\n")}],
            },
            {"role": "assistant", "content": sample.turns[1][1]},
        ]
    )
    theirs = processor(images=Image.open(sample.images[0]), text=text, return_tensors="pt")
    assert theirs["input_ids"][0].tolist() == enc.input_ids
    assert torch.allclose(theirs["pixel_values"], pixels["pixel_values"])


def test_released_processor_pads_images_even_when_the_run_had_a_cropping_one(lora_run, tmp_path, shapes):
    """llava-hf ships a CLIPImageProcessor (centre crop); the release pads to a square as training did."""
    import shutil

    from PIL import Image
    from transformers import AutoProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from lora_llava.data.images import pixel_values

    run = shutil.copytree(lora_run, tmp_path / "run")
    processor = AutoProcessor.from_pretrained(run)
    ip = processor.image_processor
    processor.image_processor = CLIPImageProcessorPil(
        size=ip.size, crop_size=ip.crop_size, image_mean=ip.image_mean, image_std=ip.image_std
    )
    processor.save_pretrained(run)
    lora_llava.merge(run, tmp_path / "out", check=False)
    released = AutoProcessor.from_pretrained(tmp_path / "out")
    image = Image.open(
        next(p for p in sorted((shapes / "images").glob("*.png")) if Image.open(p).size[0] != Image.open(p).size[1])
    )
    expected = pixel_values([image], processor.image_processor, "pad")
    assert torch.allclose(released.image_processor(images=[image], return_tensors="pt")["pixel_values"], expected)
    assert not torch.allclose(processor.image_processor(images=[image], return_tensors="pt")["pixel_values"], expected)


def test_model_card_and_recipe(merged, qlora_run):
    folder, report = merged["qlora"]
    card = (folder / "README.md").read_text()
    metrics = [json.loads(line) for line in (qlora_run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in metrics if "loss" in r][-1]
    assert "base_model: " + str(load_recipe(qlora_run / "recipe.yaml").model.name_or_path) in card
    assert f"{report.parity.max_abs:.3g}" in card and f"{100 * report.parity.top1:.2f}%" in card
    assert f"{last['loss']:.4f}" in card and "4-bit NF4 (QLoRA)" in card and "`train.json`" in card
    assert "LlavaForConditionalGeneration.from_pretrained" in card and "apply_chat_template" in card
    assert (folder / "recipe.yaml").read_text() == (qlora_run / "recipe.yaml").read_text()


def test_failed_parity_check_exits_1_and_leaves_no_target(lora_run, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(ParityError, match="parity check") as e:
        lora_llava.merge(lora_run, out, dtype="bfloat16", tolerance=1e-9)
    assert e.value.exit_code == 1
    assert not out.exists() and not _leftovers(tmp_path, "out")


@pytest.mark.parametrize("error", [OSError("disk full"), KeyboardInterrupt()])
def test_interrupted_merge_leaves_no_half_written_target(lora_run, tmp_path, monkeypatch, error):
    from lora_llava.merging import shards

    written = []
    real_write = shards.ShardWriter.write

    def failing_write(self, name, tensor):
        if len(written) == 20:
            raise error
        written.append(name)
        real_write(self, name, tensor)

    monkeypatch.setattr(shards.ShardWriter, "write", failing_write)
    (tmp_path / "kept").mkdir()
    (tmp_path / "kept" / "old.txt").write_text("a release that must survive")
    for target, overwrite in ((tmp_path / "new", False), (tmp_path / "kept", True)):
        written.clear()
        with pytest.raises(type(error)):
            lora_llava.merge(lora_run, target, overwrite=overwrite, max_shard_size="100KB")
        assert len(written) == 20
    assert not (tmp_path / "new").exists()
    assert [p.name for p in (tmp_path / "kept").iterdir()] == ["old.txt"]
    assert not _leftovers(tmp_path, "new") and not _leftovers(tmp_path, "kept")


def test_sharded_output_and_checkpoint_folder(merged, lora_run, tmp_path):
    """Small shards get an index and hold the same tensors; a checkpoint-N folder merges with its run's recipe."""
    report = lora_llava.merge(lora_run / "checkpoint-3", tmp_path / "sharded", max_shard_size="100KB", check=False)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert report.shards == len(files) > 2 and set(index["weight_map"].values()) == set(files)
    for name in files:
        with safe_open(str(tmp_path / "sharded" / name), framework="pt") as f:
            assert all(index["weight_map"][k] == name for k in f.keys())
    single = _tensors(merged["lora"][0])
    sharded = _tensors(tmp_path / "sharded")
    assert single.keys() == sharded.keys() and all(torch.equal(single[k], sharded[k]) for k in single)


def test_bare_adapter_folder_merges_with_generated_parity_samples(lora_run, merged, tmp_path):
    """A PEFT adapter alone (no recipe, no processor): base from adapter_config, samples generated."""
    import shutil

    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copy(lora_run / name, adapter / name)
    report = lora_llava.merge(adapter, tmp_path / "out", dtype="float32")
    assert report.parity.source == "generated samples" and report.parity.passed and report.parity.max_abs < 1e-4
    single, bare = _tensors(merged["lora"][0]), _tensors(tmp_path / "out")
    assert all(torch.equal(single[k], bare[k]) for k in single)


def test_existing_target_refused_with_exit_2_and_kept(lora_run, tmp_path):
    out = tmp_path / "release"
    out.mkdir()
    (out / "weights.bin").write_text("someone's model")
    result = run_cli("merge", str(lora_run), "--output", str(out))
    assert result.returncode == 2
    assert f"--output: {out} exists and is not empty (use --overwrite to replace it)" in result.stderr
    assert "Traceback" not in result.stderr and (out / "weights.bin").read_text() == "someone's model"


def test_wrong_inputs_are_clear_errors(lora_run, tmp_path):
    from lora_llava.model.tiny import make_tiny

    with pytest.raises(ModelError, match="not a lora-llava run or PEFT adapter folder"):
        lora_llava.merge(tmp_path, tmp_path / "out")
    with pytest.raises(OutputError, match="overlaps the run"):
        lora_llava.merge(lora_run, lora_run / "merged")
    other = make_tiny(tmp_path / "other", image_size=56, text_hidden=32)
    with pytest.raises(ModelError, match="does not fit this base model"):
        lora_llava.merge(lora_run, tmp_path / "out", base=str(other))
    assert not (tmp_path / "out").exists()


def test_stage1_run_merges_base_with_its_new_projector(tiny_model, captions, tmp_path):
    """A stage-1 run (projector only) merged through the CLI: the base with the aligned projector, nothing else changed."""
    recipe = {
        "stage": "align",
        "model": {"name_or_path": str(tiny_model), "dtype": "float32"},
        "data": {
            "train": [{"path": str(captions / "captions.json"), "image_folder": str(captions / "images")}],
            "template": "plain",
            "max_length": 128,
        },
        "train": {
            "output_dir": str(tmp_path / "stage1"),
            "max_steps": 2,
            "batch_size": 4,
            "learning_rate": 1e-2,
            "warmup_ratio": 0.0,
            "save_steps": 100,
        },
    }
    lora_llava.train(parse_recipe(recipe))
    result = run_cli("merge", str(tmp_path / "stage1"), "-o", str(tmp_path / "merged"))
    assert result.returncode == 0, result.stderr[-2000:]
    assert "projector: from" in result.stdout and "parity on 4 sample(s) from the training data" in result.stdout
    base, out = load_file(str(tiny_model / "model.safetensors")), _tensors(tmp_path / "merged")
    projector = load_file(str(tmp_path / "stage1" / "projector.safetensors"))
    assert all(torch.equal(out[f"multi_modal_projector.{k}"], v) for k, v in projector.items())
    assert any(not torch.equal(base[f"multi_modal_projector.{k}"], v) for k, v in projector.items())
    assert all(torch.equal(out[k], base[k]) for k in base if "multi_modal_projector" not in k)
    assert "stage 1 (alignment)" in (tmp_path / "merged" / "README.md").read_text()
