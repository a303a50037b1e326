"""Dataset formats: LLaVA JSON / JSONL, Hugging Face datasets, text-only samples; validation and image paths."""

from __future__ import annotations

import json
import os

import pytest
from PIL import Image

from lora_llava.data import formats as F
from lora_llava.data.dataset import LlavaDataset
from lora_llava.data.formats import SampleError, to_sample
from lora_llava.data.readers import read_llava
from lora_llava.errors import DataError
from lora_llava.recipe.schema import DatasetSpec

SPEC = DatasetSpec(path="unused.json")
SUFFIX = "Answer the question using a single word or phrase."


def conv(*texts: str) -> list[dict]:
    return [{"from": "human" if k % 2 == 0 else "gpt", "value": t} for k, t in enumerate(texts)]


def chat(*texts: str, image_first: bool = False) -> list[dict]:
    out = []
    for k, t in enumerate(texts):
        parts = [{"type": "text", "text": t}]
        if k == 0 and image_first:
            parts.insert(0, {"type": "image", "text": None})
        out.append({"role": "user" if k % 2 == 0 else "assistant", "content": parts})
    return out


def hf_rows():
    red = Image.new("RGB", (30, 20), (200, 30, 30))
    return [
        {"id": "hf-img", "messages": chat("What colour?", "red", image_first=True), "images": [red]},
        {"id": "hf-text", "messages": chat("What is a lung?", "an organ"), "images": []},
    ]


def save_hf(rows, folder=None, parquet=None):
    import datasets

    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "messages": datasets.List(
                {
                    "role": datasets.Value("string"),
                    "content": datasets.List({"type": datasets.Value("string"), "text": datasets.Value("string")}),
                }
            ),
            "images": datasets.List(datasets.Image()),
        }
    )
    ds = datasets.Dataset.from_list(rows, features=features)
    if folder:
        ds.save_to_disk(str(folder))
    if parquet:
        ds.to_parquet(str(parquet))


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    for name in ("a.png", "b.png"):
        Image.new("RGB", (30, 20), (200, 30, 30)).save(folder / name)
    return folder


def test_llava_records_single_image_list_and_text_only():
    one = to_sample({"id": "1", "image": "a.png", "conversations": conv("What is <image> this?", "a cat")}, 0, SPEC)
    assert one.turns == (("user", "<image>\nWhat is  this?"), ("assistant", "a cat"))  # moved as LLaVA does
    two = to_sample({"id": "2", "image": ["a.png", "b.png"], "conversations": conv("<image> and <image>: same?", "yes")}, 1, SPEC)
    assert two.images == ("a.png", "b.png") and two.turns[0][1] == "<image> and <image>: same?"  # several: kept in place
    text = to_sample({"id": "3", "conversations": conv("Hi", "Hello", "Bye", "Goodbye")}, 2, SPEC)
    assert text.images == () and len(text.turns) == 4
    later = to_sample({"id": "4", "image": "a.png", "conversations": conv("Hi", "Hello", "And this <image>", "a cat")}, 3, SPEC)
    assert later.turns[2][1] == "<image>\nAnd this"


def test_chat_layout_records_and_system_message():
    record = {
        "messages": [{"role": "system", "content": "Be brief."}, *chat("What colour?", "red", image_first=True)],
        "images": ["a.png"],
    }
    s = to_sample(record, 7, SPEC)
    assert s.id == "#7" and s.system == "Be brief." and s.turns == (("user", "<image>\nWhat colour?"), ("assistant", "red"))


@pytest.mark.parametrize(
    "record, kind",
    [
        ({"conversations": [{"from": "doctor", "value": "x"}, {"from": "gpt", "value": "y"}]}, F.UNKNOWN_ROLE),
        ({"conversations": conv("q", "a")[::-1]}, F.NOT_ALTERNATING),
        ({"conversations": conv("q", "a", "q2")}, F.NOT_ALTERNATING),
        ({"conversations": [*conv("q"), *conv("q")]}, F.NOT_ALTERNATING),
        ({"conversations": conv("q", "   ")}, F.EMPTY_ANSWER),
        ({"image": "a.png", "conversations": conv("no tag here", "a")}, F.TAG_MISMATCH),
        ({"conversations": conv("<image>\nq", "a")}, F.TAG_MISMATCH),
        ({"image": ["a.png"], "conversations": conv("<image><image> q", "a")}, F.TAG_MISMATCH),
        ({"image": "a.png", "conversations": conv("<image> q", "see <image>")}, F.TAG_MISMATCH),
        ({"conversations": "q a"}, F.MALFORMED),
        ({"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "a"}]}, F.MALFORMED),
        ({"image": 5, "conversations": conv("<image> q", "a")}, F.MALFORMED),
        ({"messages": [{"role": "user", "content": [{"type": "video"}]}, {"role": "assistant", "content": "a"}]}, F.MALFORMED),
    ],
)
def test_bad_records_raise_sample_error_with_kind_and_id(record, kind):
    with pytest.raises(SampleError) as e:
        to_sample({"id": "bad-1", **record}, 0, SPEC)
    assert e.value.kind == kind and e.value.sample_id == "bad-1" and "sample bad-1" in str(e.value)


def test_response_suffix_is_added_once_per_question():
    spec = DatasetSpec(path="x.json", response_suffix=SUFFIX)
    s = to_sample(
        {"id": "v", "image": "a.png", "conversations": conv("<image>\nColour?", "red", f"Shape?\n{SUFFIX}", "circle")}, 0, spec
    )
    assert s.turns[0][1] == f"<image>\nColour?\n{SUFFIX}" and s.turns[2][1] == f"Shape?\n{SUFFIX}"
    assert s.turns[1][1] == "red"


def test_json_reader_keeps_records_compact_and_exact(tmp_path):
    records = [
        {"id": "é-1", "conversations": conv("Qu'est-ce que c'est ?", "un poumon")},
        {"id": "2", "conversations": conv("a", "b")},
    ]
    (tmp_path / "d.json").write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n\n", encoding="utf-8")
    for name in ("d.json", "d.jsonl"):
        seen: list = []
        store = read_llava(tmp_path / name, lambda i, r, seen=seen: seen.append((i, r["id"])))
        assert [store[i] for i in range(len(store))] == records and seen == [(0, "é-1"), (1, "2")]
    (tmp_path / "broken.json").write_text('[{"id": 1},\n{"id": 2,,}]')
    with pytest.raises(DataError, match="broken.json: invalid JSON at line 2"):
        read_llava(tmp_path / "broken.json")
    with pytest.raises(DataError, match="expected a JSON list"):
        (tmp_path / "obj.json").write_text('{"id": 1}')
        read_llava(tmp_path / "obj.json")


def test_every_format_loads_into_one_mixture(tmp_path, images, tiny_processor):
    """LLaVA JSON, JSONL, a save_to_disk folder, parquet and chat-layout JSONL, image and text-only samples together."""
    llava = [
        {"id": "j-img", "image": "a.png", "conversations": conv("<image>\nColour?", "red")},
        {"id": "j-text", "conversations": conv("What is a CT?", "a scan")},
    ]
    (tmp_path / "llava.json").write_text(json.dumps(llava))
    (tmp_path / "llava.jsonl").write_text("\n".join(json.dumps(r) for r in llava))
    chat_jsonl = [{"id": "c-img", "messages": chat("<image>\nColour?", "red"), "images": ["b.png"]}]
    (tmp_path / "chat.jsonl").write_text(json.dumps(chat_jsonl[0]))
    save_hf(hf_rows(), folder=tmp_path / "hf", parquet=tmp_path / "hf.parquet")
    specs = (
        DatasetSpec(path=str(tmp_path / "llava.json"), image_folder=str(images)),
        DatasetSpec(path=str(tmp_path / "llava.jsonl"), image_folder=str(images)),
        DatasetSpec(path=str(tmp_path / "chat.jsonl"), image_folder=str(images)),
        DatasetSpec(path=str(tmp_path / "hf")),
        DatasetSpec(path=str(tmp_path / "hf.parquet")),
    )
    ds = LlavaDataset(specs, tiny_processor, "vicuna_v1", 256)
    assert ds.report.bad == [] and len(ds) == 9
    ids = [ds.sample(j).id for j in range(len(ds))]
    assert ids == ["j-img", "j-text", "j-img", "j-text", "c-img", "hf-img", "hf-text", "hf-img", "hf-text"]
    for j in range(len(ds)):
        item = ds[j]
        has_image = ds.sample(j).id.endswith("img")
        assert (item["pixel_values"] is not None) == has_image
        if has_image:
            assert item["pixel_values"].shape == (1, 3, 56, 56)
    assert [n > 0 for n in ds.modality_lengths()] == [i.endswith("img") for i in ids]


def test_image_paths_must_stay_inside_the_image_folder(tmp_path, images):
    outside = tmp_path / "secret.png"
    Image.new("RGB", (8, 8)).save(outside)
    (images / "link.png").symlink_to(outside)
    (tmp_path / "elsewhere").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "elsewhere" / "c.png")
    (images / "sub").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    refs = {
        "dots": "../secret.png",
        "abs": str(outside),
        "link": "link.png",
        "dirlink": "sub/c.png",
        "ok": "a.png",
        "gone": "nope.png",
    }
    records = [{"id": k, "image": v, "conversations": conv("<image>\nq", "a")} for k, v in refs.items()]
    (tmp_path / "d.json").write_text(json.dumps(records))
    from lora_llava.data.dataset import Source

    strict = Source(DatasetSpec(path=str(tmp_path / "d.json"), image_folder=str(images)))
    found = {e.sample_id: e.kind for e in strict.bad}
    assert found == {
        "dots": F.PATH_ESCAPES,
        "abs": F.PATH_ESCAPES,
        "link": F.PATH_ESCAPES,
        "dirlink": F.PATH_ESCAPES,
        "gone": F.MISSING_IMAGE,
    }
    assert strict.good.tolist() == [4]
    allowed = Source(DatasetSpec(path=str(tmp_path / "d.json"), image_folder=str(images)), allow_absolute_paths=True)
    assert {e.sample_id: e.kind for e in allowed.bad} == {"gone": F.MISSING_IMAGE}
    assert os.fspath(allowed.sample(0).images[0]) == os.path.normpath(images / "../secret.png")


def test_missing_data_files_are_data_errors(tmp_path, tiny_processor):
    with pytest.raises(DataError, match="data file not found"):
        LlavaDataset((DatasetSpec(path=str(tmp_path / "none.json")),), tiny_processor, "vicuna_v1", 64)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DataError, match="neither a save_to_disk folder nor a folder of parquet files"):
        LlavaDataset((DatasetSpec(path=str(tmp_path / "empty_dir")),), tiny_processor, "vicuna_v1", 64)


def test_hf_image_references_are_read_without_decoding_in_any_batch_size():
    import datasets

    from lora_llava.data.readers import EMBEDDED, iter_hf

    stored = datasets.Dataset.from_list([{"images": [Image.new("RGB", (4, 4))] * (i % 3)} for i in range(7)])
    stored = stored.cast_column("images", datasets.List(datasets.Image()))
    paths = datasets.Dataset.from_list([{"images": [f"p{i}_{k}.png" for k in range(i % 3)]} for i in range(7)])
    for batch_size in (1, 2, 3, 1000):
        assert [r["images"] for r in iter_hf(stored, batch_size)] == [[EMBEDDED] * (i % 3) for i in range(7)]
        assert [r["images"] for r in iter_hf(paths, batch_size)] == [[f"p{i}_{k}.png" for k in range(i % 3)] for i in range(7)]
