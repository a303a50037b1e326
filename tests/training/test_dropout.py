"""LoRA's dropout: one mask per input shared by q/k/v and by gate/up (lora.shared_dropout), and the CPU's mask draw."""

from __future__ import annotations

import pytest
import torch

from lora_llava.training.dropout import LoraDropout, _CpuDropout
from tests.helpers import recipe_dict

ATTN, MLP = ("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj")


def _model(tiny_model, shapes, tmp_path, shared: bool, dtype: str):
    from lora_llava.model.build import load_for_training
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.lora import setup_instruct

    raw = recipe_dict(tiny_model, shapes, tmp_path / "r", lora={"dropout": 0.5, "shared_dropout": shared}, model={"dtype": dtype})
    recipe = parse_recipe(raw)
    model, processor = load_for_training(recipe)
    return setup_instruct(model, recipe), processor, recipe


def _lora_inputs(model, batch) -> dict[str, torch.Tensor]:
    """What each projection of the first decoder layer feeds its LoRA A matrix: its input after dropout."""
    layer = model.get_base_model().model.language_model.layers[0]
    seen, hooks = {}, []
    for block, names in (("self_attn", ATTN + ("o_proj",)), ("mlp", MLP + ("down_proj",))):
        for name in names:
            lora_a = getattr(getattr(layer, block), name).lora_A["default"]
            hooks.append(lora_a.register_forward_hook(lambda m, args, out, name=name: seen.__setitem__(name, args[0])))
    # 16-bit models train under autocast (the trainer's), which the fp32 projector needs
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=model.dtype == torch.bfloat16):
        model(**batch)
    for h in hooks:
        h.remove()
    return seen


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_projections_reading_one_input_see_one_mask_and_others_their_own(tiny_model, shapes, tmp_path, dtype):
    from lora_llava.data.build import build_dataset
    from lora_llava.data.dataset import collate

    seen = {}
    for shared in (True, False):
        model, processor, recipe = _model(tiny_model, shapes, tmp_path, shared, dtype)
        ds = build_dataset(recipe, processor)
        batch = collate([ds[i] for i in range(2)], processor.tokenizer.pad_token_id)
        model.train()
        torch.manual_seed(0)
        seen[shared] = _lora_inputs(model, batch)
        dropouts = {id(m) for m in model.modules() if isinstance(m, LoraDropout)}
        layers = len(model.get_base_model().model.language_model.layers)
        assert len(dropouts) == layers * (4 if shared else 7)  # masks drawn per forward pass
        model.eval()  # no dropout at all
        assert all((x == 0).float().mean() < 0.01 for x in _lora_inputs(model, batch).values())
    s, own = seen[True], seen[False]
    # 16-bit layers under autocast: LoRA reads their 16-bit input (its matmuls run in bf16 either way), no fp32 copy
    assert all(x.dtype == (torch.float32 if dtype == "float32" else torch.bfloat16) for x in s.values())
    for group in (ATTN, MLP):
        first = s[group[0]]
        assert ((first == 0).float().mean() - 0.5).abs() < 0.05  # dropped at the rate asked for
        assert all(s[n] is first for n in group[1:])  # one tensor: one mask, one cast
        assert not any(torch.equal(own[group[0]] == 0, own[n] == 0) for n in group[1:])  # peft's way: a mask each
    assert not torch.equal(s["q_proj"] == 0, s["gate_proj"] == 0)  # different inputs, different masks


def test_cpu_dropout_draws_bernoulli_keep_and_owes_torch_s_scale():
    torch.manual_seed(0)
    x = torch.randn(200_000, dtype=torch.float64, requires_grad=True)
    p = 0.05
    y = _CpuDropout.apply(x, p)  # the mask only; the scale goes into LoRA's
    kept = y != 0
    assert abs(kept.double().mean().item() - (1 - p)) < 3e-3
    torch.testing.assert_close(y[kept], x[kept])
    y.backward(torch.ones_like(y))
    torch.testing.assert_close(x.grad, kept.double())
    d = LoraDropout(p).train()
    d.fold_scale = True  # as the fused LoRA forward sets it
    dropped, owed = d.drop(x.detach())
    assert owed == pytest.approx(1 / (1 - p))
    d.fold_scale = False  # a reader that does not fold it gets the scaled tensor
    assert d.drop(x.detach())[1] == 1.0
    torch.manual_seed(3)
    a = d(x.detach())
    torch.manual_seed(3)
    b = torch.nn.functional.dropout(x.detach(), p)  # torch's own: same rate, same scale (another mask)
    assert abs((a == 0).double().mean() - (b == 0).double().mean()) < 3e-3
    torch.testing.assert_close(a[a != 0], x.detach()[a != 0] / (1 - p))


def test_the_same_random_state_draws_the_same_mask_and_a_new_input_a_new_one():
    """What a checkpointed layer's recompute relies on: the replay from the same RNG state finds the same mask."""
    d = LoraDropout(0.5, readers=3)
    x = torch.randn(64, 32)
    torch.manual_seed(1)
    a = [d.drop(x)[0] for _ in range(3)]
    assert a[0] is a[1] is a[2]
    torch.manual_seed(1)
    x2 = x.clone()  # the recomputed input: equal values, another tensor
    b = d.drop(x2)[0]
    assert b is not a[0] and torch.equal(b, a[0])
    x2.add_(1)  # changed in place: never served from the memo
    assert not torch.equal(d.drop(x2)[0] == 0, b == 0)


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_the_fused_lora_forward_gives_peft_s_loss_and_gradients(tiny_model, shapes, tmp_path, dropout):
    """Scaling on the rank and addmm (training/lora_forward.py) against peft's own forward, with the same masks."""
    from peft.tuners.lora.layer import Linear

    from lora_llava.data.build import build_dataset
    from lora_llava.data.dataset import collate
    from lora_llava.model.build import load_for_training
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.lora import setup_instruct
    from lora_llava.training.loss import causal_lm_loss

    recipe = parse_recipe(recipe_dict(tiny_model, shapes, tmp_path / "r", lora={"dropout": dropout}))
    results = []
    for fused in (True, False):
        model, processor = load_for_training(recipe)
        torch.manual_seed(0)
        model = setup_instruct(model, recipe)
        layers = [m for m in model.modules() if type(m) is Linear]
        assert len(layers) == 7 * len(model.get_base_model().model.language_model.layers)
        assert all(("forward" in vars(m)) is True for m in layers)  # every LoRA projection is fused
        if not fused:
            for m in layers:
                del m.forward  # peft's own
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.05, generator=torch.Generator().manual_seed(len(name)))
        model.train()
        ds = build_dataset(recipe, processor)
        batch = collate([ds[i] for i in range(3)], processor.tokenizer.pad_token_id)
        torch.manual_seed(1)
        loss, _ = causal_lm_loss(model, batch, None)
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    assert ga.keys() == gb.keys()
    for k in ga:
        torch.testing.assert_close(ga[k], gb[k], rtol=1e-4, atol=1e-6, msg=k)
