"""`lora-llava check`: every defect reported with its sample id, a non-zero exit; clean data passes."""

from __future__ import annotations

import json
import re

from PIL import Image

from lora_llava.data import formats as F
from tests.helpers import recipe_dict, run_cli, write_recipe

DEFECTS = {
    "no-image": (F.MISSING_IMAGE, {"image": "gone.png", "conversations": "ok"}),
    "broken-image": (F.UNREADABLE_IMAGE, {"image": "corrupt.png", "conversations": "ok"}),
    "doctor": (F.UNKNOWN_ROLE, {"conversations": [{"from": "doctor", "value": "q"}, {"from": "gpt", "value": "a"}]}),
    "two-humans": (F.NOT_ALTERNATING, {"conversations": [{"from": "human", "value": "q"}, {"from": "human", "value": "q"}]}),
    "silent": (F.EMPTY_ANSWER, {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": ""}]}),
    "two-tags": (
        F.TAG_MISMATCH,
        {"image": "a.png", "conversations": [{"from": "human", "value": "<image> <image> q"}, {"from": "gpt", "value": "a"}]},
    ),
    "five-images": (
        F.TOO_LONG,
        {
            "image": ["a.png"] * 5,
            "conversations": [{"from": "human", "value": "<image>" * 5 + " Same?"}, {"from": "gpt", "value": "yes"}],
        },
    ),
    "escapes": (F.PATH_ESCAPES, {"image": "../secret.png", "conversations": "ok"}),
}
OK_TURNS = [{"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "red"}]


def _dataset(root, defects: bool):
    images = root / "images"
    images.mkdir(parents=True)
    for name in ("a.png", "b.png"):
        Image.new("RGB", (40, 30), (200, 30, 30)).save(images / name)
    Image.new("RGB", (8, 8)).save(root / "secret.png")
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 20)
    answers = [[OK_TURNS[0], {"from": "gpt", "value": "red " * (1 + i % 5)}] for i in range(12)]
    records = [{"id": f"good-{i}", "image": "a.png" if i % 2 else "b.png", "conversations": answers[i]} for i in range(12)]
    records += [
        {
            "id": f"text-{i}",
            "conversations": [{"from": "human", "value": "What is a lung?"}, {"from": "gpt", "value": "an organ"}],
        }
        for i in range(4)
    ]
    if defects:
        for sid, (_, record) in DEFECTS.items():
            record = dict(record)
            if record["conversations"] == "ok":
                record["conversations"] = OK_TURNS
            records.append({"id": sid, **record})
    (root / "train.json").write_text(json.dumps(records))
    return root


def _recipe(tmp_path, tiny_model, data, **data_keys):
    train = [{"path": str(data / "train.json"), "image_folder": str(data / "images")}]
    raw = recipe_dict(tiny_model, data, tmp_path / "run", data={"train": train, "max_length": 96, **data_keys})
    return write_recipe(tmp_path / "recipe.yaml", raw)


def test_check_reports_every_defect_with_its_sample_id_and_fails(tmp_path, tiny_model):
    data = _dataset(tmp_path / "data", defects=True)
    report = tmp_path / "report.json"
    result = run_cli("check", str(_recipe(tmp_path, tiny_model, data)), "--json", str(report))
    assert result.returncode == 1, result.stderr[-2000:]
    out = result.stdout
    for sid, (kind, _) in DEFECTS.items():
        assert f"  {kind}: 1\n" in out, kind
        assert f"sample {sid}: " in out, sid
    assert f"train {data / 'train.json'}: 24 samples, 8 bad" in out
    assert "FAIL: bad share train 33.33% (data.max_bad_fraction 0)" in out
    assert "Traceback" not in result.stderr
    saved = json.loads(report.read_text())
    assert {(b["id"], b["kind"]) for b in saved["bad"]} == {(sid, kind) for sid, (kind, _) in DEFECTS.items()}
    assert saved["failed"] is True and saved["datasets"][0]["bad"] == 8
    assert not (tmp_path / "run").exists()  # check writes nothing of a run


def test_check_tolerates_the_share_the_recipe_accepts(tmp_path, tiny_model):
    data = _dataset(tmp_path / "data", defects=True)
    result = run_cli("check", str(_recipe(tmp_path, tiny_model, data)), "data.max_bad_fraction=0.4", "--workers", "2")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "ok: bad share train 33.33% (data.max_bad_fraction 0.4)" in result.stdout


def test_check_on_clean_data_passes_with_lengths_and_padding(tmp_path, tiny_model):
    data = _dataset(tmp_path / "data", defects=False)
    eval_spec = [{"path": str(data / "train.json"), "image_folder": str(data / "images"), "max_samples": 4}]
    result = run_cli("check", str(_recipe(tmp_path, tiny_model, data, eval=eval_spec)))
    assert result.returncode == 0, result.stdout + result.stderr[-2000:]
    out = result.stdout
    assert "recipe: ok (stage instruct, template vicuna_v1, max_length 96, images pad)" in out
    assert f"train {data / 'train.json'}: 16 samples, 0 bad" in out and f"eval  {data / 'train.json'}: 16 samples, 0 bad" in out
    assert "bad samples: none" in out
    # image samples: BOS + system + 16 image tokens + question + answer (1-5 words); text-only ones are shorter
    lengths = re.search(r"token lengths \(train\): p50 (\d+), p90 \d+, p95 \d+, p99 (\d+), max (\d+)", out)
    p50, p99, longest = map(int, lengths.groups())
    assert 40 < p50 < p99 <= longest <= 96
    padding = re.search(r"expected padding: ([\d.]+)% of the tokens of an epoch \(batch 4, modality-length grouping\)", out)
    assert 0 < float(padding.group(1)) < 20


def test_a_bad_recipe_is_exit_2_in_one_line(tmp_path, tiny_model):
    data = _dataset(tmp_path / "data", defects=False)
    result = run_cli("check", str(_recipe(tmp_path, tiny_model, data)), "data.max_lenght=10")
    assert result.returncode == 2
    assert "data.max_lenght: unknown key (did you mean data.max_length?)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_check_a_composed_model_reads_no_weights(tmp_path, shapes):
    """A recipe composing CLIP + an LLM: the processor comes from the tokenizer and the tower's config only."""
    from lora_llava.check import check
    from lora_llava.model.tiny import make_tiny_parts
    from lora_llava.recipe.parse import parse_recipe

    clip, llm = make_tiny_parts(tmp_path / "parts", image_size=56)
    for weights in [*clip.glob("*.safetensors"), *llm.glob("*.safetensors")]:
        weights.unlink()  # check must not need them
    raw = recipe_dict(tmp_path, shapes, tmp_path / "run")
    raw["model"] = {"vision_tower": str(clip), "language_model": str(llm), "dtype": "float32"}
    report = check(parse_recipe(raw), workers=0)
    assert not report.failed and report.datasets[0].records == 36 and min(report.lengths) > 16
