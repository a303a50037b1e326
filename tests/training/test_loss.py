"""The lean training path gives the plain path's loss and gradients: chunked loss, non-reentrant checkpointing."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from lora_llava.training.loss import causal_lm_loss, chunked_linear_cross_entropy
from tests.helpers import recipe_dict


def _trainable_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def _assert_same_grads(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=lambda m, n=name: f"{n}: {m}")


@pytest.fixture(scope="module")
def lora_model_and_batch(tiny_model, shapes, tmp_path_factory):
    """The tiny model with LoRA (dropout 0.05) and the projector trainable, fp32, and a padded batch of 4."""
    from lora_llava.data.build import build_dataset
    from lora_llava.data.dataset import collate
    from lora_llava.model.build import load_for_training
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.lora import setup_instruct

    recipe = parse_recipe(recipe_dict(tiny_model, shapes, tmp_path_factory.mktemp("loss") / "r", lora={"dropout": 0.05}))
    model, processor = load_for_training(recipe)
    model = setup_instruct(model, recipe)
    ds = build_dataset(recipe, processor)
    batch = collate([ds[i] for i in (0, 4, 7, 9)], processor.tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any(), "the batch should hold padding"
    # LoRA B starts at zero; give it values so that LoRA A gets gradients too.
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02, generator=torch.Generator().manual_seed(len(n)))
    return model, batch


def _loss_and_grads(model, batch, chunked: bool, num_items=None):
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)  # the same LoRA dropout masks in both paths
    if chunked:
        loss, _ = causal_lm_loss(model, batch, num_items)
    else:
        kwargs = {"num_items_in_batch": num_items} if num_items is not None else {}
        loss = model(**batch, **kwargs).loss
    loss.backward()
    return loss.detach(), _trainable_grads(model)


def test_chunked_linear_cross_entropy_equals_cross_entropy():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(23, 16, generator=g, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(41, 16, generator=g, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(41, generator=g, dtype=torch.float64, requires_grad=True)
    target = torch.randint(0, 41, (23,), generator=g)

    expected = F.cross_entropy(F.linear(hidden, weight, bias), target, reduction="sum")
    want = torch.autograd.grad(expected, (hidden, weight, bias))
    got_loss = chunked_linear_cross_entropy(hidden, weight, target, bias, rows=5)  # 5 chunks, the last one short
    got = torch.autograd.grad(got_loss * 3.0, (hidden, weight, bias))  # backward scales by the incoming gradient

    torch.testing.assert_close(got_loss.double(), expected, rtol=1e-6, atol=1e-6)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, 3.0 * b, rtol=1e-6, atol=1e-9)


def test_chunked_loss_equals_the_model_loss_and_gradients(lora_model_and_batch):
    model, batch = lora_model_and_batch
    plain_loss, plain = _loss_and_grads(model, batch, chunked=False)
    loss, grads = _loss_and_grads(model, batch, chunked=True)

    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    assert any("lora_A" in n for n in grads) and any("modules_to_save" in n for n in grads)
    _assert_same_grads(grads, plain, rtol=1e-4, atol=1e-6)


def test_chunked_loss_normalises_by_num_items_in_batch(lora_model_and_batch):
    """Under gradient accumulation the Trainer divides by the supervised tokens of all micro-batches."""
    model, batch = lora_model_and_batch
    supervised = int((batch["labels"][:, 1:] != -100).sum())
    num_items = torch.tensor(3 * supervised)
    plain_loss, plain = _loss_and_grads(model, batch, chunked=False, num_items=num_items)
    loss, grads = _loss_and_grads(model, batch, chunked=True, num_items=num_items)
    mean_loss, _ = _loss_and_grads(model, batch, chunked=True)

    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(loss * 3, mean_loss, rtol=1e-6, atol=1e-6)
    _assert_same_grads(grads, plain, rtol=1e-4, atol=1e-6)


def test_chunked_loss_never_builds_the_logits(lora_model_and_batch):
    model, batch = lora_model_and_batch
    with torch.no_grad():
        _, outputs = causal_lm_loss(model, batch)
    assert outputs.logits.shape[1] == 0  # lm_head projected no position
    assert outputs.loss is not None


def test_chunked_loss_keeps_the_ignore_index_and_shift(lora_model_and_batch):
    """A sample whose labels are all -100 contributes nothing, as in transformers' loss."""
    model, batch = lora_model_and_batch
    masked = {k: v.clone() for k, v in batch.items()}
    masked["labels"][0] = -100
    plain_loss, plain = _loss_and_grads(model, masked, chunked=False)
    loss, grads = _loss_and_grads(model, masked, chunked=True)
    torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
    _assert_same_grads(grads, plain, rtol=1e-4, atol=1e-6)


def test_checkpointing_all_or_some_layers_changes_nothing_and_recomputes_only_those(tiny_model, shapes, tmp_path):
    """Non-reentrant checkpointing of none, all, or the first of the decoder layers (what auto chooses): the same loss
    and gradients (dropout included); each checkpointed layer, and only it, runs its attention twice per step."""
    from lora_llava.data.build import build_dataset
    from lora_llava.data.dataset import collate
    from lora_llava.model.build import load_for_training
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.lora import decoder_layers, enable_checkpointing, setup_instruct

    recipe = parse_recipe(recipe_dict(tiny_model, shapes, tmp_path / "r", lora={"dropout": 0.05}))
    results = {}
    for checkpointed in ("none", "all", 1):
        model, processor = load_for_training(recipe)
        n = len(decoder_layers(model))
        k = {"none": 0, "all": n}.get(checkpointed, checkpointed)
        if k:
            enable_checkpointing(model, None if checkpointed == "all" else k)
        torch.manual_seed(0)  # the same LoRA A initialisation in every model
        model = setup_instruct(model, recipe)
        layers = decoder_layers(model)
        assert [layer.gradient_checkpointing for layer in layers] == [i < k for i in range(n)]
        if k:
            assert all(layer._gradient_checkpointing_func.keywords == {"use_reentrant": False} for layer in layers)
        calls = [0] * n
        for i, layer in enumerate(layers):
            layer.self_attn.register_forward_hook(lambda *_, i=i, calls=calls: calls.__setitem__(i, calls[i] + 1))
        tower = model.get_base_model().model.vision_tower
        tower_calls = []
        for layer in tower.encoder.layers:
            layer.self_attn.register_forward_hook(lambda m, args, out, seen=tower_calls: seen.append(out[0].requires_grad))
        model.train()
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.02, generator=torch.Generator().manual_seed(len(name)))
        ds = build_dataset(recipe, processor)
        batch = collate([ds[i] for i in range(3)], processor.tokenizer.pad_token_id)
        results[checkpointed] = _loss_and_grads(model, batch, chunked=True)
        assert calls == [2 if i < k else 1 for i in range(n)], (checkpointed, calls)  # forward + one recompute each
        # The frozen tower runs once, building no graph: nothing is back-propagated through it or recomputed.
        assert tower_calls == [False] * len(tower.encoder.layers), tower_calls
    assert 0 < 1 < n  # the partial case leaves a layer out
    plain_loss, plain = results["none"]
    for checkpointed in ("all", 1):
        loss, grads = results[checkpointed]
        torch.testing.assert_close(loss, plain_loss, rtol=1e-6, atol=1e-6)
        _assert_same_grads(grads, plain, rtol=1e-4, atol=1e-6)


def test_training_with_chunked_and_standard_loss_gives_the_same_run(tiny_model, shapes, tmp_path):
    """Through `train`, with gradient accumulation: the same logged losses and the same adapter."""
    from safetensors.torch import load_file

    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    runs = {}
    for loss in ("chunked", "standard"):
        settings = {"loss": loss, "max_steps": 2, "batch_size": 2, "grad_accum": 2}
        runs[loss] = train(parse_recipe(recipe_dict(tiny_model, shapes, tmp_path / loss, train=settings)))
    rows = {k: [json.loads(x) for x in (v / "metrics.jsonl").read_text().splitlines()] for k, v in runs.items()}
    losses = {k: [r["loss"] for r in v if "loss" in r] for k, v in rows.items()}
    assert len(losses["chunked"]) == 2
    assert losses["chunked"] == pytest.approx(losses["standard"], rel=1e-5)
    a, b = (load_file(str(runs[k] / "adapter_model.safetensors")) for k in ("chunked", "standard"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)
