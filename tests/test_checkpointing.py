"""`train.gradient_checkpointing: auto`: the fewest checkpointed layers that fit the memory, and what `estimate` and `train` say.

That checkpointing some layers gives the same loss and gradients as checkpointing
all, and recomputes only those layers, is tested in tests/training/test_loss.py.
"""

from __future__ import annotations

import pytest

from lora_llava.errors import RecipeError
from lora_llava.memory.checkpointing import MARGIN, plan, plan_for_training
from lora_llava.memory.estimate import estimate
from lora_llava.memory.shapes import BUILTIN_SHAPES, GiB
from lora_llava.recipe.parse import load_recipe, parse_recipe
from tests.helpers import ROOT, recipe_dict, run_main

MEDICAL = str(ROOT / "recipes" / "medical.yaml")  # LLaVA-1.5-13B QLoRA, r=128, 2048 tokens


def _auto(*overrides: str):
    return load_recipe(MEDICAL, ["train.gradient_checkpointing=auto", *overrides])


def test_auto_checkpoints_the_fewest_layers_that_fit_and_fewer_on_larger_cards():
    recipe, shape = _auto(), BUILTIN_SHAPES["llava-hf/llava-1.5-13b-hf"]
    n, chosen = shape.layers, []
    # From the smallest card that fits with every layer checkpointed to one that fits with none.
    least, most = (estimate(recipe, shape, checkpointed=k).total / (1 - MARGIN) for k in (n, 0))
    for share in (0, 0.25, 0.5, 0.75, 1, 1.5):
        budget = least + share * (most - least)
        p = plan(recipe, shape, budget, "card")
        assert p.auto and p.of == n and p.fits
        assert p.estimate.total <= budget * (1 - MARGIN)
        assert p.estimate == estimate(recipe, shape, checkpointed=p.layers)
        if p.layers:  # one layer fewer would not fit
            assert estimate(recipe, shape, checkpointed=p.layers - 1).total > budget * (1 - MARGIN)
        chosen.append(p.layers)
    assert chosen == sorted(chosen, reverse=True)
    assert chosen[0] > chosen[2] > 0 and chosen[-2:] == [0, 0]  # with room to spare nothing is recomputed
    assert 0 < plan(recipe, shape, 24 * GiB, "24 GiB").layers < n  # a 24 GiB card needs some of the 13B's layers, not all
    # Keeping a layer's activations costs far more than its checkpointed input: each layer left out adds memory,
    # up to the last one, which (checkpointed) is recomputed at once and keeps its input besides.
    peaks = [estimate(recipe, shape, checkpointed=k).total for k in range(n + 1)]
    assert peaks[:-1] == sorted(peaks[:-1], reverse=True) and peaks[-1] >= peaks[-2] - 64 * 2**20


def test_auto_that_cannot_fit_checkpoints_everything_and_says_so():
    recipe, shape = _auto(), BUILTIN_SHAPES["llava-hf/llava-1.5-13b-hf"]
    p = plan(recipe, shape, 8 * GiB, "8.0 GiB card")
    peaks = [estimate(recipe, shape, checkpointed=k).total for k in range(shape.layers + 1)]
    assert not p.fits and p.estimate.total == min(peaks) and p.layers == peaks.index(min(peaks)) >= shape.layers - 1
    assert f"of 40 decoder layers checkpointed (the lowest peak), and still the predicted peak {min(peaks) / GiB:.1f} GiB" in p.describe()


@pytest.mark.parametrize("value, layers", [(True, 40), (False, 0), (12, 12), (99, 40)])
def test_true_false_and_a_number_keep_their_meaning(value, layers):
    recipe = load_recipe(MEDICAL, [f"train.gradient_checkpointing={str(value).lower()}"])
    p = plan(recipe, BUILTIN_SHAPES["llava-hf/llava-1.5-13b-hf"], 1 * GiB, "tiny card")
    assert (p.layers, p.auto) == (layers, False)  # the budget does not change a fixed choice


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.gradient_checkpointing=-2", "train.gradient_checkpointing: -2 layers"),
        ("train.gradient_checkpointing=sometimes", "train.gradient_checkpointing: expected true/false or integer or 'auto'"),
        ("train.gpu_memory=a lot", "train.gpu_memory: 'a lot' is not a memory size"),
    ],
)
def test_bad_values_are_recipe_errors(override, message):
    with pytest.raises(RecipeError, match=message):
        load_recipe(MEDICAL, [override])


def test_estimate_prints_the_choice_and_its_peak():
    result = run_main("estimate", MEDICAL, "train.gradient_checkpointing=auto", "--gpu-memory", "24GiB")
    assert result.returncode == 0, result.stderr
    line = next(x for x in result.stdout.splitlines() if x.startswith("gradient checkpointing auto:"))
    p = plan(_auto(), BUILTIN_SHAPES["llava-hf/llava-1.5-13b-hf"], 24 * GiB, "24.0 GiB card")
    assert line == p.describe()
    assert f"the first {p.layers} of 40 decoder layers checkpointed" in line
    assert f"predicted peak {p.estimate.total / GiB:.1f} GiB of 24.0 GiB card" in line
    assert f"total: {p.estimate.total / GiB:.1f} GiB" in result.stdout  # the table is that choice's
    fixed = run_main("estimate", MEDICAL, "--gpu-memory", "24GiB")
    assert "gradient checkpointing: all of 40 decoder layers checkpointed" in fixed.stdout


def test_a_training_run_plans_for_its_loaded_model_and_the_stated_memory(tiny_model, shapes, tmp_path):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(tiny_model)
    raw = recipe_dict(tiny_model, shapes, tmp_path / "r", train={"gradient_checkpointing": "auto", "gpu_memory": "1GiB"})
    roomy = plan_for_training(parse_recipe(raw), config)
    assert (roomy.layers, roomy.of, roomy.card) == (0, config.text_config.num_hidden_layers, "1.0 GiB card")
    raw["train"]["gpu_memory"] = "1MiB"
    assert plan_for_training(parse_recipe(raw), config).layers == roomy.of
    raw["train"].pop("gpu_memory")  # on the CPU: the machine's RAM
    assert plan_for_training(parse_recipe(raw), config).card.startswith("this machine's RAM")
