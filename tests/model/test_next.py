"""LLaVA-NeXT (AnyRes): the grid chosen as the reference code chooses it, and image tokens equal to the model's features."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lora_llava.data.dataset import LlavaDataset, collate
from lora_llava.data.encode import anyres_token_count, anyres_worst_case
from lora_llava.data.formats import TOO_LONG, SampleError
from lora_llava.data.images import image_inputs
from lora_llava.model.family import NEXT, default_grid, family_of, next_config
from lora_llava.model.load import load_model, load_processor
from lora_llava.recipe.schema import DatasetSpec, ModelConfig


def reference_best_resolution(width: int, height: int, pinpoints: list[list[int]]) -> tuple[int, int]:
    """The reference LLaVA code's choice, written from its description: pairs read as (width, height), first best wins."""
    best, best_effective, best_wasted = None, 0, float("inf")
    for w, h in pinpoints:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def reference_tokens(width: int, height: int, tile: int, patch: int, pinpoints) -> int:
    """Features of the reference `spatial_unpad` packing: unpadded tile features, a newline per row, the global view."""
    w, h = reference_best_resolution(width, height, pinpoints)
    side = tile // patch
    rows, cols = side * (h // tile), side * (w // tile)
    if width / height > cols / rows:
        new = int(height * cols / width)
        rows -= 2 * ((rows - new) // 2)
    else:
        new = int(width * rows / height)
        cols -= 2 * ((cols - new) // 2)
    return rows * cols + rows + side * side


@pytest.fixture(scope="module")
def processor_336(tmp_path_factory, tiny_next):
    """A NeXT processor at LLaVA-NeXT's real resolution and grid (336-px tiles), from a config alone."""
    from transformers import CLIPVisionConfig, LlamaConfig

    from lora_llava.model.compose import llava_config
    from lora_llava.model.processor import next_processor

    tokenizer = load_processor(str(tiny_next)).tokenizer
    config = next_config(llava_config(CLIPVisionConfig(image_size=336, patch_size=14), LlamaConfig(), tokenizer))
    return next_processor(tokenizer, config)


def test_the_grid_is_the_reference_choice_ties_included(processor_336):
    grid = default_grid(336)
    assert grid == [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
    assert anyres_token_count(processor_336, 300, 100) == 776  # transformers as shipped: 1360
    sizes = [(300, 100), (100, 300), (336, 336), (200, 200), (50, 40), (1000, 400), (400, 1000), (2000, 2000), (672, 336)]
    sizes += [(p[0], p[1]) for p in grid] + [(1200, 300), (300, 1200), (640, 480), (480, 640), (1024, 768)]
    for w, h in sizes:
        assert anyres_token_count(processor_336, w, h) == reference_tokens(w, h, 336, 14, grid), (w, h)
    assert anyres_worst_case(processor_336) == 2928  # 576 + a full 2 x 2 grid (2304) + 48 row newlines


def test_a_next_checkpoint_is_detected_and_its_grid_read_once(tiny_next, tmp_path):
    config = json.loads((tiny_next / "config.json").read_text())
    assert config["model_type"] == NEXT and config["grid_pinpoints_order"] == "height_width"
    model = load_model(ModelConfig(name_or_path=str(tiny_next), dtype="float32"))
    assert family_of(model.config) == NEXT
    assert model.config.image_grid_pinpoints == [[112, 56], [56, 112], [112, 112], [56, 168], [168, 56]]  # swapped once
    assert load_processor(str(tiny_next)).image_processor.image_grid_pinpoints == model.config.image_grid_pinpoints


SIZES = [(w, h) for w in (1, 7, 30, 56, 57, 100, 112, 168, 300, 1000) for h in (1, 20, 56, 90, 168, 700)]
SIZES += [(56, 112), (112, 56), (112, 112), (168, 56), (56, 168), (3000, 12), (12, 3000)]


def test_image_tokens_equal_the_features_the_model_packs(tiny_next):
    """For 67 sizes (tall, wide, tiny, huge, each pinpoint): the data pipeline's count is the model's feature count."""
    model = load_model(ModelConfig(name_or_path=str(tiny_next), dtype="float32")).eval()
    processor = load_processor(str(tiny_next))
    images = [Image.new("RGB", size, (10 * i % 255, 80, 160)) for i, size in enumerate(SIZES)]
    inputs = image_inputs(images, processor.image_processor)
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], inputs["image_sizes"], vision_feature_layer=-2)
    lengths = [len(f) for f in out.pooler_output]  # per image: packed as the language model receives them
    counts = [anyres_token_count(processor, *im.size) for im in images]
    assert lengths == counts
    assert len(set(counts)) > 8


def test_a_forward_pass_runs_at_every_max_length(tiny_next, tmp_path):
    processor = load_processor(str(tiny_next))
    model = load_model(ModelConfig(name_or_path=str(tiny_next), dtype="float32")).eval()
    (tmp_path / "images").mkdir()
    Image.new("RGB", (150, 40), "red").save(tmp_path / "images" / "wide.png")
    Image.new("RGB", (30, 120), "blue").save(tmp_path / "images" / "tall.png")
    conv = [
        {"from": "human", "value": "<image>\nWhat colour is the wide one?"},
        {"from": "gpt", "value": "red"},
        {"from": "human", "value": "<image>\nAnd this one?"},
        {"from": "gpt", "value": "blue, and it is tall"},
    ]
    (tmp_path / "d.json").write_text(json.dumps([{"id": "two", "image": ["wide.png", "tall.png"], "conversations": conv}]))
    spec = DatasetSpec(path=str(tmp_path / "d.json"), image_folder=str(tmp_path / "images"))
    first = anyres_token_count(processor, 150, 40)
    fitted = too_long = 0
    for max_length in range(first - 5, first + anyres_token_count(processor, 30, 120) + 60, 4):
        ds = LlavaDataset((spec,), processor, "vicuna_v1", max_length)
        try:
            item = ds[0]
        except Exception as e:  # the only sample cannot fit: the dataset says so
            assert "no usable image sample" in str(e)
            too_long += 1
            with pytest.raises(SampleError) as err:
                ds.encode_sample(ds.sample(0))
            assert err.value.kind == TOO_LONG
            continue
        assert len(item["input_ids"]) <= max_length
        with torch.no_grad():
            out = model(**collate([item], processor.tokenizer.pad_token_id))
        assert torch.isfinite(out.loss)
        fitted += 1
    assert fitted > 10 and too_long >= 1


def test_check_counts_each_images_own_tokens(tiny_next, shapes, tmp_path):
    from lora_llava.check import check
    from lora_llava.recipe import parse_recipe
    from tests.helpers import recipe_dict

    recipe = parse_recipe(recipe_dict(tiny_next, shapes, tmp_path / "out"), "test")
    report = check(recipe)
    assert report.bad == [] and not report.failed
    ds = LlavaDataset.for_recipe(recipe, load_processor(str(tiny_next)))
    expected = sorted(len(ds.encode_sample(ds.sample(j), pixels=False)[0].input_ids) for j in range(len(ds)))
    assert sorted(report.lengths) == expected
    wide, tall = anyres_token_count(ds.processor, 64, 48), anyres_token_count(ds.processor, 48, 64)
    assert wide != tall  # the shapes data has both orientations: lengths follow each image
    assert "template vicuna_v1" in report.header


def test_make_tiny_next_from_the_command_line(tmp_path, capsys):
    from lora_llava.cli import main

    assert main(["make-tiny", str(tmp_path / "t"), "--next", "--image-size", "56"]) == 0
    processor = load_processor(str(tmp_path / "t"))
    assert type(processor).__name__ == "LlavaNextProcessor"
    assert anyres_token_count(processor, 300, 100) > 16  # more than LLaVA-1.5's single 56-px view


def test_the_hd_demo_task_is_lost_in_one_view_and_kept_in_the_tiles(tiny_model, tiny_next, tmp_path):
    """The demo's texture task: checks and plain grey of the same mean look alike at LLaVA-1.5's single view, not in tiles."""
    from lora_llava.data.images import image_inputs
    from lora_llava.data.synthetic import make_texture_dataset

    samples = json.loads(make_texture_dataset(tmp_path, n_images=24, seed=0).read_text())
    one_view, tiles = load_processor(str(tiny_model)), load_processor(str(tiny_next))

    def detail(sample, processor) -> float:
        """Mean difference of neighbouring pixels in the busiest view: what fine checks add and averaging removes."""
        image = Image.open(tmp_path / "images" / sample["image"]).convert("RGB")
        x = image_inputs([image], processor.image_processor)["pixel_values"][0]
        x = x.reshape(-1, *x.shape[-3:])
        return float((x[..., :, 1:] - x[..., :, :-1]).abs().mean(dim=(-1, -2, -3)).max())

    by = {(a, o): [] for a in ("checkered", "plain") for o in ("wide", "tall")}
    for sample in samples:
        width, height = Image.open(tmp_path / "images" / sample["image"]).size
        by[(sample["answer"], "wide" if width > height else "tall")].append(sample)
    for orientation in ("wide", "tall"):
        checks, plain = by[("checkered", orientation)], by[("plain", orientation)]
        assert checks and plain
        one = [sum(detail(s, one_view) for s in group) / len(group) for group in (checks, plain)]
        assert abs(one[0] - one[1]) < 0.02  # one 56-px view: the checks average to the plain square's grey
        assert min(detail(s, tiles) for s in checks) > 4 * max(detail(s, tiles) for s in plain)  # AnyRes keeps them


def test_stage1_trains_projector_and_image_newline_and_its_file_carries_both(tiny_next, shapes, tmp_path):
    from lora_llava.model.projector import load_projector, save_projector
    from lora_llava.recipe import parse_recipe
    from lora_llava.training.lora import param_groups, setup_align
    from tests.helpers import recipe_dict

    raw = recipe_dict(tiny_next, shapes, tmp_path / "out", stage="align", data={"template": "plain"})
    recipe = parse_recipe(raw, "test")
    model = setup_align(load_model(recipe.model), recipe)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "model.image_newline" in trainable and all("multi_modal_projector" in n or n == "model.image_newline" for n in trainable)
    assert sum(p.numel() for g in param_groups(model, recipe) for p in g["params"]) == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    with torch.no_grad():
        model.model.image_newline.add_(1.0)
    save_projector(model, tmp_path / "projector.safetensors")
    fresh = load_model(recipe.model)
    load_projector(fresh, tmp_path / "projector.safetensors")
    torch.testing.assert_close(fresh.model.image_newline, model.model.image_newline)


def test_a_fresh_llava_hf_next_checkpoint_is_swapped_once(tiny_next, tmp_path):
    """A checkpoint as llava-hf ships it (the reference's list, no marker): read swapped, written marked, never swapped again."""
    import shutil

    fresh = shutil.copytree(tiny_next, tmp_path / "fresh")
    reference = [[56, 112], [112, 56], [112, 112], [168, 56], [56, 168]]
    for name, nest in (("config.json", None), ("processor_config.json", "image_processor")):
        data = json.loads((fresh / name).read_text())
        target = data[nest] if nest else data
        target.pop("grid_pinpoints_order", None)
        target["image_grid_pinpoints"] = reference
        (fresh / name).write_text(json.dumps(data))
    model = load_model(ModelConfig(name_or_path=str(fresh), dtype="float32"))
    processor = load_processor(str(fresh))
    swapped = [[b, a] for a, b in reference]
    assert model.config.image_grid_pinpoints == swapped == processor.image_processor.image_grid_pinpoints
    model.save_pretrained(tmp_path / "written")
    processor.save_pretrained(tmp_path / "written")
    again = load_model(ModelConfig(name_or_path=str(tmp_path / "written"), dtype="float32"))
    assert again.config.image_grid_pinpoints == swapped == load_processor(str(tmp_path / "written")).image_processor.image_grid_pinpoints
