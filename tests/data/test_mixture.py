"""Mixtures, bad-sample policy, modality-length batching, and a mixed LLaVA JSON + HF dataset run."""

from __future__ import annotations

import json
from collections import Counter

import pytest
from PIL import Image

from lora_llava.data.batching import ModalityLengthSampler, epoch_order, padding_fraction
from lora_llava.data.dataset import LlavaDataset
from lora_llava.errors import DataError, RecipeError
from lora_llava.recipe.parse import parse_recipe
from lora_llava.recipe.schema import DatasetSpec
from tests.helpers import recipe_dict, run_cli, write_recipe


def _write(path, n: int, prefix: str, image: str | None = "a.png", bad: int = 0):
    records = []
    for i in range(n):
        record = {
            "id": f"{prefix}-{i}",
            "conversations": [{"from": "human", "value": "Colour?"}, {"from": "gpt", "value": "red " * (i + 1)}],
        }
        if image:
            record["image"] = image
            record["conversations"][0]["value"] = "<image>\nColour?"
        records.append(record)
    for i in range(bad):
        records[i]["conversations"][1]["value"] = ""  # empty answer
    path.write_text(json.dumps(records))
    return str(path)


@pytest.fixture
def folder(tmp_path):
    Image.new("RGB", (30, 20), (200, 30, 30)).save(tmp_path / "a.png")
    return tmp_path


def test_weights_and_caps_shape_the_mixture(folder, tiny_processor):
    a = _write(folder / "a.json", 10, "a")
    b = _write(folder / "b.json", 10, "b", image=None)
    c = _write(folder / "c.json", 4, "c")
    specs = (DatasetSpec(path=a, weight=2.0), DatasetSpec(path=b, max_samples=3), DatasetSpec(path=c, weight=0.5))
    ds = LlavaDataset(specs, tiny_processor, "vicuna_v1", 256, seed=1)
    per_source = Counter(ds.sample(j).id.split("-")[0] for j in range(len(ds)))
    assert per_source == {"a": 20, "b": 3, "c": 2}
    assert Counter(ds.sample(j).id for j in range(len(ds)) if ds.sample(j).id.startswith("a")) == {f"a-{i}": 2 for i in range(10)}
    again = LlavaDataset(specs, tiny_processor, "vicuna_v1", 256, seed=1)
    assert [again.sample(j).id for j in range(len(again))] == [ds.sample(j).id for j in range(len(ds))]


def test_bad_samples_are_an_error_or_skipped_per_recipe(folder, tiny_model, tiny_processor):
    from lora_llava.data.build import build_dataset

    data = _write(folder / "d.json", 10, "d", bad=2)

    def recipe(**data_keys):
        raw = recipe_dict(
            tiny_model, folder, folder / "out", data={"train": [{"path": data, "image_folder": str(folder)}], **data_keys}
        )
        return parse_recipe(raw)

    with pytest.raises(DataError, match="sample d-0: turn 1: empty answer .2 bad sample.s. of 10"):
        build_dataset(recipe(), tiny_processor)
    with pytest.raises(DataError, match="more than data.max_bad_fraction 0.1"):
        build_dataset(recipe(on_bad_sample="skip", max_bad_fraction=0.1), tiny_processor)
    ds = build_dataset(recipe(on_bad_sample="skip", max_bad_fraction=0.2), tiny_processor)
    assert len(ds) == 8 and {ds.sample(j).id for j in range(8)} == {f"d-{i}" for i in range(2, 10)}
    with pytest.raises(RecipeError, match="data.on_bad_sample: skip needs data.max_bad_fraction > 0"):
        recipe(on_bad_sample="skip")


def test_full_validation_finds_unreadable_images_before_training(folder, tiny_model, tiny_processor):
    from lora_llava.data.build import build_dataset

    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    data = _write(folder / "d.json", 6, "d")
    records = json.loads((folder / "d.json").read_text())
    records[3]["image"] = "broken.png"
    (folder / "d.json").write_text(json.dumps(records))

    def recipe(**data_keys):
        raw = recipe_dict(
            tiny_model, folder, folder / "out", data={"train": [{"path": data, "image_folder": str(folder)}], **data_keys}
        )
        return parse_recipe(raw)

    with pytest.raises(DataError, match="sample d-3: .*broken.png: unreadable image"):
        build_dataset(recipe(), tiny_processor)
    assert len(build_dataset(recipe(on_bad_sample="skip", max_bad_fraction=0.2), tiny_processor)) == 5
    lazy = build_dataset(recipe(validate="index"), tiny_processor)  # starts; the worker skips the sample and counts it
    assert len(lazy) == 6
    item = lazy[3]
    assert item["skipped"] == ["d-3"] and item["pixel_values"].shape[0] == 1


def test_modality_length_batches_hold_one_modality():
    lengths = [5, 40, 7, 33, 9, 12, 50, 3, 22, 8, 30, 41, 17] + [-4, -60, -9, -25, -31, -2, -18]  # 13 image, 7 text-only
    for batch, accum in ((4, 1), (2, 2), (3, 1)):
        sampler = ModalityLengthSampler(lengths, batch * accum, seed=3)
        order = list(sampler)
        assert len(order) == len(sampler)
        assert set(order) == set(range(len(lengths)))  # every sample, each at least once
        extra = Counter(order) - Counter(range(len(lengths)))
        assert all(lengths[i] > 0 for i in extra) and sum(extra.values()) < batch * accum  # repeats fill the image tail only
        batches = [order[s : s + batch] for s in range(0, len(order), batch)]
        assert all(len({lengths[i] > 0 for i in b}) == 1 for b in batches), batches
        sampler.set_epoch(1)
        assert list(sampler) != order and sorted(set(sampler)) == sorted(set(order))


def test_grouping_cuts_padding():
    lengths = [(i * 37) % 200 + 10 for i in range(400)] + [-((i * 53) % 300 + 10) for i in range(100)]
    tokens = [abs(n) for n in lengths]
    grouped = padding_fraction(tokens, epoch_order(lengths, True, 64, 0), 8)
    shuffled = padding_fraction(tokens, epoch_order(lengths, False, 64, 0), 8)
    assert grouped < 0.1 < 0.3 < shuffled
    assert padding_fraction([4, 2, 2, 4], [0, 1, 2, 3], 2) == 0.25


def _hf_folder(shapes, out):
    """The shapes train set in the chat layout, images stored inside a save_to_disk folder, plus text-only rows."""
    import datasets

    rows = []
    for r in json.loads((shapes / "train.json").read_text())[:12]:
        q, a = r["conversations"][0]["value"].replace("<image>\n", ""), r["conversations"][1]["value"]
        messages = [
            {"role": "user", "content": [{"type": "image", "text": None}, {"type": "text", "text": q}]},
            {"role": "assistant", "content": [{"type": "text", "text": a}]},
        ]
        rows.append(
            {"id": "hf-" + r["id"], "messages": messages, "images": [Image.open(shapes / "images" / r["image"]).convert("RGB")]}
        )
    for i in range(6):
        text = [
            {"role": "user", "content": [{"type": "text", "text": "What is a lung?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "an organ"}]},
        ]
        rows.append({"id": f"hf-text-{i}", "messages": text, "images": []})
    datasets.Dataset.from_list(rows).cast_column("images", datasets.List(datasets.Image())).save_to_disk(str(out))
    return out


def test_a_recipe_mixing_llava_json_and_an_hf_folder_trains(tmp_path, tiny_model, shapes):
    hf = _hf_folder(shapes, tmp_path / "hf")
    out = tmp_path / "run"
    train = [{"path": str(shapes / "train.json"), "image_folder": str(shapes / "images")}, {"path": str(hf), "weight": 0.5}]
    recipe = write_recipe(tmp_path / "mix.yaml", recipe_dict(tiny_model, shapes, out, data={"train": train}))
    result = run_cli("train", str(recipe), "train.batch_size=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "45 training samples" in result.stdout  # 36 + half of 18
    assert "padding: about" in result.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3]
    assert (out / "adapter_model.safetensors").is_file()
