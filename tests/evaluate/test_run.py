"""`lora-llava eval`: the medical-VQA metrics and POPE on hand-made answers, reading eval files, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lora_llava.errors import DataError
from lora_llava.evaluate.metrics import closed_correct, pope_answer, pope_metrics, score, token_recall
from lora_llava.evaluate.questions import Question, read_questions
from lora_llava.recipe.schema import DatasetSpec
from tests.helpers import recipe_dict, run_cli, write_recipe


def q(qid: str, text: str, reference: str | None, kind: str | None) -> Question:
    return Question(qid, (("user", f"<image>\n{text}"),), (), reference, kind)


def test_closed_accuracy_open_recall_and_exact_match_on_hand_made_answers():
    questions = [
        q("c1", "Is there a fracture?", "yes", "closed"),
        q("c2", "Is the lung normal?", "no", "closed"),
        q("c3", "Is there an effusion?", "no", "closed"),
        q("c4", "Which side is the lesion on?", "left", "closed"),
        q("o1", "What organ is shown?", "left lung", "open"),
        q("o2", "What modality is this?", "ct", "open"),
        q("o3", "Where is the mass?", "upper right lobe", "open"),
    ]
    answers = [
        "Yes, there is a fracture.",  # first yes/no word: yes -> correct
        "The lung is not normal: no.",  # "not" is no yes/no word; first is "no" -> correct
        "I cannot tell",  # neither yes nor no -> wrong
        "On the left.",  # closed, non yes/no reference found in the answer -> correct
        "The left lung.",  # recall 2/2, not exact
        "CT",  # recall 1, exact (case and punctuation normalised)
        "right lobe",  # recall 2/3
    ]
    rows, report = score(questions, answers)
    assert report["n"] == 7
    assert report["closed"] == {"n": 4, "accuracy": 0.75, "exact_match": 0.0}
    assert report["open"]["n"] == 3
    assert report["open"]["recall"] == pytest.approx((1 + 1 + 2 / 3) / 3)
    assert report["open"]["exact_match"] == pytest.approx(1 / 3)
    assert report["exact_match"] == pytest.approx(1 / 7)
    assert [r.get("correct") for r in rows[:4]] == [True, True, False, True]
    assert rows[4] == {
        "id": "o1",
        "question": "What organ is shown?",
        "answer": "The left lung.",
        "reference": "left lung",
        "type": "open",
        "exact_match": False,
        "recall": 1.0,
    }
    assert "pope" in report and report["pope"]["n"] == 2  # "Is there a fracture/an effusion?" with yes/no references


def test_metric_edge_cases():
    assert token_recall("no idea", "") == 0.0
    assert token_recall("mass mass", "mass mass mass") == pytest.approx(2 / 3)  # with multiplicity
    assert not closed_correct("yes and no", "no")  # the first yes/no word decides
    assert not closed_correct("The knowledge is not here", "no")  # "no" inside a word does not count
    assert closed_correct("NO.", "No")


def test_pope_metrics_on_hand_made_answers():
    pairs = [
        ("Yes, there is a dog in the image.", "yes"),  # TP
        ("There is a dog.", "yes"),  # no "no"/"not": yes -> TP
        ("No, there is not.", "yes"),  # FN
        ("There is not any cat. Yes.", "no"),  # first sentence has "not": no -> TN
        ("yes", "no"),  # FP
        ("no", "no"),  # TN
    ]
    assert [pope_answer(a) for a, _ in pairs] == ["yes", "yes", "no", "no", "yes", "no"]
    m = pope_metrics(pairs)
    assert m["n"] == 6
    assert m["accuracy"] == pytest.approx(4 / 6)
    assert m["precision"] == pytest.approx(2 / 3)
    assert m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3)
    assert m["yes_ratio"] == pytest.approx(3 / 6)


def test_pope_probe_only_for_existence_questions():
    _, report = score([q("1", "Is the shape red?", "yes", "closed")], ["yes"])
    assert "pope" not in report
    _, report = score([q("1", "Are there any nodules in the image?", "no", "closed")], ["yes"])
    assert report["pope"]["yes_ratio"] == 1.0 and report["pope"]["accuracy"] == 0.0


def _write(tmp_path: Path, records, name="eval.json") -> DatasetSpec:
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    (tmp_path / "a.png").write_bytes(b"")  # never opened by read_questions
    return DatasetSpec(path=str(path), image_folder=str(tmp_path))


def test_question_types_from_answer_type_or_yes_no_reference(tmp_path):
    conv = lambda q, a: [{"from": "human", "value": f"<image>\n{q}"}, {"from": "gpt", "value": a}]  # noqa: E731
    spec = _write(
        tmp_path,
        [
            {
                "id": "rad-1",
                "image": "a.png",
                "conversations": conv("Is it on the left or right?", "left"),
                "answer_type": "CLOSED",
            },
            {"id": "rad-2", "image": "a.png", "conversations": conv("Is there a mass?", "yes"), "answer_type": "OPEN"},
            {"id": "s-3", "image": "a.png", "conversations": conv("Is there a mass?", "No")},
            {"id": "s-4", "image": "a.png", "conversations": conv("What organ?", "liver"), "question_type": "open"},
        ],
    )
    questions = read_questions(spec)
    assert [(x.id, x.kind, x.reference) for x in questions] == [
        ("rad-1", "closed", "left"),
        ("rad-2", "open", "yes"),
        ("s-3", "closed", "No"),
        ("s-4", "open", "liver"),
    ]
    assert questions[0].turns == (("user", "<image>\nIs it on the left or right?"),)
    assert Path(questions[0].images[0]) == tmp_path / "a.png"
    assert len(read_questions(spec, limit=2)) == 2


def test_multi_turn_samples_give_one_question_per_answer_with_reference_history(tmp_path):
    record = {
        "id": "m",
        "image": "a.png",
        "conversations": [
            {"from": "human", "value": "What colour is it?\n<image>"},
            {"from": "gpt", "value": "red"},
            {"from": "human", "value": "Is it round?"},
            {"from": "gpt", "value": "yes"},
        ],
    }
    first, second = read_questions(_write(tmp_path, [record]))
    assert (first.id, second.id) == ("m#1", "m#2")
    assert first.turns == (("user", "<image>\nWhat colour is it?"),)  # the image tag moves to the front, as in training
    assert second.turns == (("user", "<image>\nWhat colour is it?"), ("assistant", "red"), ("user", "Is it round?"))
    assert (first.kind, second.kind) == ("open", "closed")


def test_question_files_and_open_questions(tmp_path):
    pope = [
        {"question_id": 7, "image": "a.png", "text": "Is there a person in the image?", "label": "yes"},
        {"question_id": 8, "image": "a.png", "text": "Describe the image."},
    ]
    first, second = read_questions(_write(tmp_path, pope, "pope.jsonl"))
    assert (first.id, first.reference, first.kind, first.turns[0][1]) == (
        "7",
        "yes",
        "closed",
        "<image>\nIs there a person in the image?",
    )
    assert (second.id, second.reference, second.kind) == ("8", None, None)
    pending = {"id": "p", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nWhat is this?"}]}
    (only,) = read_questions(_write(tmp_path, [pending], "pending.json"))
    assert only.reference is None and only.turns == (("user", "<image>\nWhat is this?"),)


def test_a_malformed_sample_names_the_file_and_sample(tmp_path):
    spec = _write(tmp_path, [{"id": "bad-7", "image": "a.png", "conversations": [{"from": "robot", "value": "hi"}]}])
    with pytest.raises(DataError, match=r"eval.json: sample bad-7: turn 0: unknown role 'robot'"):
        read_questions(spec)


@pytest.fixture(scope="module")
def eval_recipe(tmp_path_factory, tiny_model, shapes, lora_run):
    """The lora_run recipe with the shapes test set as data.eval."""
    r = recipe_dict(tiny_model, shapes, lora_run)
    r["data"]["eval"] = [{"path": str(shapes / "test.json"), "image_folder": str(shapes / "images")}]
    return write_recipe(tmp_path_factory.mktemp("eval") / "r.yaml", r)


def test_eval_cli_with_a_recipe_writes_predictions_and_metrics(eval_recipe, tmp_path):
    out = tmp_path / "eval"
    args = ("eval", str(eval_recipe), "--limit", "5", "--max-new-tokens", "3", "--output", str(out))
    result = run_cli(*args)
    assert result.returncode == 0, result.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 5 and {"id", "question", "answer", "reference", "type", "exact_match", "dataset"} <= set(rows[0])
    metrics = json.loads((out / "metrics.json").read_text())
    (report,) = metrics.values()
    assert report["n"] == 5 and report["closed"]["n"] + report["open"]["n"] == 5
    assert "closed (yes/no):" in result.stdout and "open:" in result.stdout
    before = (out / "metrics.json").read_bytes()
    again = run_cli(*args)
    assert again.returncode == 2 and "exists (use --overwrite" in again.stderr and "Traceback" not in again.stderr
    assert (out / "metrics.json").read_bytes() == before


def test_eval_cli_with_model_and_data(tiny_model, lora_run, shapes, tmp_path):
    out = tmp_path / "p.jsonl"
    result = run_cli(
        "eval", "--model", str(tiny_model), "--adapter", str(lora_run), "--data", str(shapes / "test.json"),
        "--image-folder", str(shapes / "images"), "--limit", "3", "--max-new-tokens", "2", "--output", str(out),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(out.read_text().splitlines()) == 3
    missing = run_cli("eval", "--model", str(tiny_model), "--data", str(tmp_path / "nope.json"))
    assert missing.returncode == 2 and "nope.json: data file not found" in missing.stderr


def test_generation_eval_during_training_goes_to_metrics(tiny_model, shapes, tmp_path):
    """train.eval_steps with data.eval: generation scores every N steps and at the end, in metrics.jsonl."""
    from lora_llava.recipe.parse import parse_recipe
    from lora_llava.training.run import train

    r = recipe_dict(tiny_model, shapes, tmp_path / "run", train={"eval_steps": 2, "max_steps": 3})
    r["data"]["eval"] = [{"path": str(shapes / "test.json"), "image_folder": str(shapes / "images"), "max_samples": 4}]
    run = train(parse_recipe(r))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    evals = [row for row in rows if "eval" in row]
    assert [row["step"] for row in evals] == [2, 3]
    report = evals[0]["eval"][str(shapes / "test.json")]
    assert report["n"] == 4 and set(report) >= {"closed", "open", "exact_match"}
    assert any("eval_loss" in row for row in rows)  # the Trainer's own eval loss is still logged


def test_eval_of_a_recipe_that_was_not_trained_says_so(eval_recipe, tmp_path):
    result = run_cli("eval", str(eval_recipe), f"train.output_dir={tmp_path / 'never'}")
    assert result.returncode == 2
    assert f"train.output_dir: {tmp_path / 'never'} holds no finished run" in result.stderr and "Traceback" not in result.stderr
