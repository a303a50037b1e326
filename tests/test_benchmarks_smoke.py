"""benchmarks/gpu_qlora.py runs on the CPU with the tiny shape (lora-llava with checkpointing auto, TRL) and builds the model QLoRA loads."""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys

import bitsandbytes as bnb
import pytest
import torch

from tests.helpers import ROOT


def _bench_module():
    spec = importlib.util.spec_from_file_location("gpu_qlora", ROOT / "benchmarks/gpu_qlora.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_model_is_built_as_qlora_loads_it(tmp_path):
    """NF4 exactly on the language model's linear layers, bf16 elsewhere, the bytes `estimate` predicts."""
    from lora_llava.memory.estimate import weight_parts

    bench = _bench_module()
    shape = bench.SIZES["tiny"]
    model = bench.build_model(shape, image_token=1024, device=torch.device("cpu"))
    four_bit = {n for n, m in model.named_modules() if isinstance(m, bnb.nn.Linear4bit)}
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert four_bit == {n for n in linears if ".language_model.layers." in n} and len(four_bit) == 7 * shape.layers
    assert {p.dtype for p in model.parameters()} == {torch.uint8, torch.bfloat16}
    language_model = model.model.language_model
    assert len(language_model.layers) == language_model.config.num_hidden_layers == shape.layers  # every layer runs
    assert language_model.layers[0].self_attn.config._attn_implementation == "sdpa"
    args = bench.parse_args(["--size", "tiny", "--seq-len", "48"])
    predicted = {p.key: p.bytes for p in weight_parts(shape, bench.bench_recipe(args, tmp_path))}
    llm = sum(
        t.untyped_storage().nbytes()
        for m in model.modules()
        if isinstance(m, bnb.nn.Linear4bit)
        for t in (m.weight, m.weight.quant_state.absmax, m.weight.quant_state.code, m.weight.quant_state.offset,
                  m.weight.quant_state.state2.absmax, m.weight.quant_state.state2.code)
    )  # fmt: skip
    vision = sum(p.numel() * p.element_size() for p in model.model.vision_tower.parameters())
    assert (llm, vision) == (predicted["llm"], predicted["vision"])


def test_gpu_benchmark_smoke_runs_both_trainers_on_cpu(tmp_path):
    out = tmp_path / "bench.json"
    cmd = [
        sys.executable,
        str(ROOT / "benchmarks/gpu_qlora.py"),
        "--size",
        "tiny",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--seq-len",
        "48",
        "--trainers",
        "lora-llava-auto",
        "trl",
        "--gpu-memory",
        "1TiB",
        "--json",
        str(out),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    data = json.loads(out.read_text())
    runs = data["runs"]
    assert set(runs) == {"lora-llava-auto", "trl"} and not any("error" in r for r in runs.values()), runs
    assert runs["lora-llava-auto"]["checkpointed_layers"] == 0  # a 1 TiB card: auto recomputes nothing
    for r in runs.values():
        assert r["steps"] == 2 and r["tokens_per_s"] > 0 and r["peak_rss_gib"] > 0
        assert math.isfinite(r["final_loss"]) and abs(r["final_loss"] - math.log(1026)) < 1.0  # random model: ~ln(vocab)
    assert runs["lora-llava-auto"]["trainable_params"] == runs["trl"]["trainable_params"]  # same LoRA and projector
    assert 0 < data["estimate"]["allocated_gib"] < data["estimate"]["total_gib"]
    assert "lora-llava-auto / TRL tokens_per_cpu_s" in result.stdout and "lora-llava estimate" in result.stdout
    assert "0 of 2 layers checkpointed" in result.stdout


def test_simulated_step_on_fake_cuda_tracks_what_estimate_predicts(tmp_path):
    """benchmarks/simulate_step.py: a 2-layer LLaVA-1.5-13B QLoRA step on fake CUDA tensors, no real memory for it."""
    out = tmp_path / "sim.json"
    args = ["--case", "13b-adamw8bit", "--layers", "2", "--json", str(out)]
    cmd = [sys.executable, str(ROOT / "benchmarks/simulate_step.py"), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    case = json.loads(out.read_text())["cases"]["13b-adamw8bit"]
    tracked, est = case["tracked"], {p["key"]: p["bytes"] for p in case["estimate"]["parts"]}
    for key in ("llm", "embeddings", "vision", "projector_frozen", "lora", "projector", "optimizer"):
        assert tracked["static"][key] == pytest.approx(est[key], rel=1e-3), key  # the allocator's 512-byte blocks aside
    assert abs(case["estimate"]["allocated"] - tracked["peak"]) < 0.1 * tracked["peak"]
    assert tracked["moment"].startswith("micro-batch 2")  # accumulating: the earlier micro-batch's gradients stay
    assert set(case["attention_kernels"]) == {"flash"} and case["peak_rss_gib"] < 2  # fake tensors: nothing allocated
