"""Datasets as distributed: column mapping and detection, splits of hub folders, filters, metadata in eval."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from lora_llava.data.build import build_dataset
from lora_llava.data.dataset import LlavaDataset
from lora_llava.errors import DataError
from lora_llava.evaluate.metrics import format_report, score
from lora_llava.evaluate.questions import read_questions
from lora_llava.recipe import parse_recipe
from lora_llava.recipe.schema import EVAL_SPLITS, Columns, DatasetSpec
from tests import replicas
from tests.helpers import recipe_dict


def _recipe(tmp_path, train: list[dict], eval: list[dict] = ()):
    raw = recipe_dict(tmp_path / "model", tmp_path, tmp_path / "out")
    raw["data"]["train"], raw["data"]["eval"] = train, list(eval)
    return parse_recipe(raw, "test")


def _turns(ds: LlavaDataset, j: int = 0):
    return ds.sample(j).turns


def test_split_defaults_are_written_into_the_recipe(tmp_path):
    r = _recipe(tmp_path, [{"path": "a"}], [{"path": "b"}, {"path": "c", "split": "validation"}])
    assert r.data.train[0].split == "train"
    assert r.data.eval[0].split == EVAL_SPLITS == ("test", "validation", "val")
    assert r.data.eval[1].split == "validation"


def test_hub_parquet_folder_reads_only_the_split_asked_for(tmp_path, tiny_processor, capsys):
    root = replicas.vqa_rad(tmp_path / "vqa_rad")
    r = _recipe(tmp_path, [{"path": str(root)}], [{"path": str(root)}])
    train = build_dataset(r, tiny_processor)
    assert len(train) == 12  # not 20: the test split stays out
    turns = _turns(train)
    assert turns[0] == ("user", "<image>\nIs there a mass in the left lung?") and turns[1] == ("assistant", "yes")
    assert train.sample(0).images[0]["bytes"][:4] == b"\x89PNG"  # the embedded image, undecoded
    err = capsys.readouterr().err
    assert "read as question/answer rows: image=image, question=question, answer=answer" in err
    test = build_dataset(r, tiny_processor, r.data.eval)
    assert len(test) == 8
    assert len(read_questions(r.data.eval[0])) == 8


def test_an_eval_split_is_the_first_of_test_validation_val_and_said(tmp_path, tiny_processor, capsys):
    root = replicas.pathvqa(tmp_path / "pathvqa")
    r = _recipe(tmp_path, [{"path": str(root)}], [{"path": str(root)}, {"path": str(root), "split": "validation"}])
    assert len(build_dataset(r, tiny_processor, r.data.eval[:1])) == 8
    assert "reading split 'test' (the first of test, validation, val it has" in capsys.readouterr().err
    assert len(build_dataset(r, tiny_processor, r.data.eval[1:])) == 6


def test_a_split_that_is_not_there_names_those_that_are(tmp_path, tiny_processor):
    root = replicas.vqa_rad(tmp_path / "vqa_rad")
    r = _recipe(tmp_path, [{"path": str(root), "split": "validation"}])
    with pytest.raises(DataError, match=r"no split validation \(it has test, train\); set split: to one of them"):
        build_dataset(r, tiny_processor)


def test_dataset_dict_folder_gives_train_for_training_and_test_for_eval(tmp_path, tiny_processor):
    root = replicas.vqa_rad_saved(tmp_path / "saved")
    r = _recipe(tmp_path, [{"path": str(root)}], [{"path": str(root)}])
    assert len(build_dataset(r, tiny_processor)) == 12
    assert len(build_dataset(r, tiny_processor, r.data.eval)) == 8
    assert [q.text for q in read_questions(r.data.eval[0])][:2] == ["Is there a mass in the left lung?", "Is the heart enlarged?"]


def test_parquet_files_of_named_splits_beside_unnamed_ones_are_refused(tmp_path, tiny_processor):
    root = replicas.vqa_rad(tmp_path / "mixed")
    (root / "data" / "test-00000-of-00001.parquet").rename(root / "data" / "extra.parquet")
    r = _recipe(tmp_path, [{"path": str(root)}])
    with pytest.raises(DataError, match=r"parquet files of named splits \(train\) beside others \(extra.parquet\)"):
        build_dataset(r, tiny_processor)


def test_slake_json_with_mapping_filters_and_metadata(tmp_path, tiny_processor, capsys):
    root = replicas.slake(tmp_path / "slake")
    columns = {"image": "img_name", "question": "question", "answer": "answer", "id": "qid"}
    spec = {"path": str(root / "train.json"), "image_folder": str(root / "imgs"), "columns": columns}
    en = build_dataset(_recipe(tmp_path, [{**spec, "filters": {"q_lang": "en"}}]), tiny_processor)
    assert len(en) == 8
    assert "8 of 12 record(s) pass data.train.0.filters" in capsys.readouterr().err
    both = build_dataset(_recipe(tmp_path, [{**spec, "filters": {"q_lang": ["en", "zh"]}}]), tiny_processor)
    zh = build_dataset(_recipe(tmp_path, [{**spec, "filters": {"q_lang": "zh"}}]), tiny_processor)
    assert len(both) == 12 and len(zh) == 4
    assert zh.sample(0).id == "8" and zh.sample(0).turns[0] == ("user", "<image>\n左肺有肿块吗?")
    assert str(zh.sample(0).images[0]).endswith("imgs/xmlab4/source.jpg")


def test_eval_groups_by_answer_type_and_language(tmp_path):
    root = replicas.slake(tmp_path / "slake")
    spec = DatasetSpec(path=str(root / "test.json"), image_folder=str(root / "imgs"), split=EVAL_SPLITS)
    questions = read_questions(spec)
    assert [q.kind for q in questions] == ["closed", "closed", "open", "open", "closed", "open"]  # CLOSED / OPEN from the data
    assert dict(questions[0].metadata) == {
        "answer_type": "CLOSED",
        "q_lang": "en",
        "content_type": "Abnormality",
        "modality": "CT",
    }
    answers = ["yes", "yes", "lung", "mri", "是", "心"]
    _, report = score(questions, answers)
    assert report["closed"] == {"n": 3, "accuracy": pytest.approx(2 / 3), "exact_match": pytest.approx(2 / 3)}
    by_lang = report["groups"]["q_lang"]
    assert by_lang["en"]["n"] == 4 and by_lang["en"]["closed_accuracy"] == 0.5 and by_lang["en"]["open_recall"] == 0.5
    assert by_lang["zh"] == {"n": 2, "exact_match": 0.5, "closed_accuracy": 1.0, "open_recall": 0.0}
    assert "answer_type" not in report["groups"]  # closed / open already is that breakdown
    assert "  q_lang=zh:    2   exact match 0.500   closed accuracy 1.000   open recall 0.000" in format_report(report)
    chosen = read_questions(DatasetSpec(path=spec.path, image_folder=spec.image_folder, columns=Columns(metadata=("q_lang",))))
    assert dict(chosen[0].metadata) == {"q_lang": "en"}


def test_prompt_completion_conversational(tmp_path, tiny_processor):
    root = replicas.prompt_completion(tmp_path / "pc")
    ds = build_dataset(
        _recipe(tmp_path, [{"path": str(root / "train.jsonl"), "image_folder": str(root / "images")}]), tiny_processor
    )
    assert len(ds) == 12
    assert _turns(ds) == (("user", "<image>\nIs there a mass in the left lung?"), ("assistant", "yes"))


@pytest.mark.parametrize(
    ("record", "turns"),
    [
        (
            {"query": "Describe it.", "response": "A lung.", "system": "You are a radiologist."},
            (("user", "Describe it."), ("assistant", "A lung.")),
        ),
        (
            {"instruction": "Name the organ.", "input": "CT, axial", "output": "liver"},
            (("user", "Name the organ.\nCT, axial"), ("assistant", "liver")),
        ),
        ({"prompt": "2 + 2 =", "completion": "4"}, (("user", "2 + 2 ="), ("assistant", "4"))),
        ({"question": "How many nodules?", "answer": 3}, (("user", "How many nodules?"), ("assistant", "3"))),
    ],
)
def test_common_field_names_are_detected(tmp_path, tiny_processor, record, turns):
    (tmp_path / "d.json").write_text(json.dumps([record] * 2), encoding="utf-8")
    ds = build_dataset(_recipe(tmp_path, [{"path": str(tmp_path / "d.json")}]), tiny_processor)
    assert _turns(ds) == turns
    assert ds.sample(0).system == record.get("system")


def test_explicit_mapping_overrides_detection(tmp_path, tiny_processor):
    rows = [{"question": "ignored", "answer": "ignored", "findings": "What is seen?", "impression": "nothing"}] * 2
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    spec = {"path": str(tmp_path / "d.json"), "columns": {"question": "findings", "answer": "impression"}}
    assert _turns(build_dataset(_recipe(tmp_path, [spec]), tiny_processor)) == (
        ("user", "What is seen?"),
        ("assistant", "nothing"),
    )


def test_a_table_in_an_unknown_layout_names_its_columns_and_the_mapping(tmp_path, tiny_processor):
    import datasets

    datasets.Dataset.from_dict({"img": ["a.png"], "q_text": ["Is it?"], "label": ["yes"]}).to_parquet(
        str(tmp_path / "odd.parquet")
    )
    r = _recipe(tmp_path, [{"path": str(tmp_path / "odd.parquet")}])
    with pytest.raises(DataError) as e:
        build_dataset(r, tiny_processor)
    assert str(e.value) == (
        f"{tmp_path / 'odd.parquet'}: records have img, q_text, label, but neither 'conversations' (LLaVA), 'messages' (chat) "
        "nor question/answer fields; map them with data.train.0.columns: {image: img, question: q_text, answer: label}"
    )


def test_json_records_of_different_shapes_are_each_read_by_their_own_fields(tmp_path, tiny_processor):
    """A text-only first record does not make later records lose their image, id or metadata; a bad one stays alone."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), "red").save(tmp_path / "images" / "a.png")
    rows = [
        {"question": "Say hi.", "answer": "hello"},
        {"query": "Odd layout?", "reply": "yes"},  # no layout reads it: bad on its own
        {"id": "r2", "image": "a.png", "question": "What colour?", "answer": "red", "answer_type": "OPEN"},
        {"id": "r3", "image": "a.png", "question": "Is it red?", "answer": "yes", "answer_type": "CLOSED"},
    ]
    (tmp_path / "d.json").write_text(json.dumps(rows), encoding="utf-8")
    spec = {"path": str(tmp_path / "d.json"), "image_folder": str(tmp_path / "images")}
    raw = recipe_dict(tmp_path / "model", tmp_path, tmp_path / "out")
    raw["data"].update(train=[spec], on_bad_sample="skip", max_bad_fraction=0.5)
    ds = build_dataset(parse_recipe(raw, "t"), tiny_processor)
    samples = [ds.sample(j) for j in range(len(ds))]
    assert [s.id for s in samples] == ["#0", "r2", "r3"] and [len(s.images) for s in samples] == [0, 1, 1]
    assert [e.sample_id for _, e in ds.report.bad] == ["#1"]
    (tmp_path / "e.json").write_text(json.dumps(rows[:1] + rows[2:]), encoding="utf-8")  # eval files must be clean
    questions = read_questions(DatasetSpec(path=str(tmp_path / "e.json"), image_folder=spec["image_folder"]))
    assert [(q.id, len(q.images), q.kind) for q in questions] == [("#0", 0, "open"), ("r2", 1, "open"), ("r3", 1, "closed")]


def test_eval_caps_max_samples_after_the_filters(tmp_path):
    root = replicas.slake(tmp_path / "slake")
    spec = DatasetSpec(
        path=str(root / "test.json"), image_folder=str(root / "imgs"), filters={"q_lang": "zh"}, max_samples=2, split=EVAL_SPLITS
    )
    assert [dict(q.metadata)["q_lang"] for q in read_questions(spec)] == ["zh", "zh"]


def test_hub_split_names_with_underscores(tmp_path, tiny_processor):
    root = replicas.hub_parquet(tmp_path / "mnli", {"train": 6, "validation_matched": 4, "validation_mismatched": 3})
    r = _recipe(tmp_path, [{"path": str(root)}], [{"path": str(root), "split": "validation_mismatched"}])
    assert len(build_dataset(r, tiny_processor)) == 6
    assert len(build_dataset(r, tiny_processor, r.data.eval)) == 3
