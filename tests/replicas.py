"""Small replicas of medical VQA datasets in the layouts they are distributed in, with generated images.

- VQA-RAD and PathVQA as their hub snapshots: `data/<split>-00000-of-00001.parquet` with an
  `image` feature (bytes and a file name), `question`, `answer`.
- VQA-RAD as a `DatasetDict.save_to_disk` folder (train / test).
- SLAKE as its authors ship it: train.json / validate.json / test.json (img_name, question,
  answer, answer_type CLOSED/OPEN, q_lang en/zh, content_type, qid...) and imgs/xmlabN/source.jpg.
- A TRL prompt/completion set: conversational `prompt` / `completion` messages and `images`.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

from PIL import Image

QUESTIONS = (  # (question, answer, answer_type, content_type)
    ("Is there a mass in the left lung?", "yes", "CLOSED", "Abnormality"),
    ("Is the heart enlarged?", "no", "CLOSED", "Organ"),
    ("Which organ is shown?", "lung", "OPEN", "Organ"),
    ("What modality is used?", "ct", "OPEN", "Modality"),
)
ZH = (("左肺有肿块吗?", "是", "CLOSED", "Abnormality"), ("图中是什么器官?", "肺", "OPEN", "Organ"))


def _image(i: int, size: tuple[int, int] = (48, 40)) -> Image.Image:
    return Image.new("RGB", size, ((37 * i) % 256, (91 * i) % 256, (53 * i) % 256))


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    _image(i).save(buf, format="PNG")
    return buf.getvalue()


def _qa_rows(n: int, offset: int) -> dict[str, list]:
    rows = [QUESTIONS[i % len(QUESTIONS)] for i in range(n)]
    return {
        "image": [{"bytes": _png(offset + i), "path": f"synpic{offset + i}.jpg"} for i in range(n)],
        "question": [q for q, *_ in rows],
        "answer": [a for _, a, *_ in rows],
    }


def _dataset(n: int, offset: int):
    import datasets

    features = datasets.Features(
        {"image": datasets.Image(), "question": datasets.Value("string"), "answer": datasets.Value("string")}
    )
    return datasets.Dataset.from_dict(_qa_rows(n, offset), features=features)


def hub_parquet(root: Path, splits: dict[str, int]) -> Path:
    """A hub snapshot folder: README.md and data/<split>-00000-of-00001.parquet per split."""
    (root / "data").mkdir(parents=True)
    (root / "README.md").write_text("---\nlicense: cc0-1.0\n---\n", encoding="utf-8")
    offset = 0
    for split, n in splits.items():
        _dataset(n, offset).to_parquet(str(root / "data" / f"{split}-00000-of-00001.parquet"))
        offset += n
    return root


def vqa_rad(root: Path) -> Path:
    return hub_parquet(root, {"train": 12, "test": 8})


def pathvqa(root: Path) -> Path:
    return hub_parquet(root, {"train": 12, "validation": 6, "test": 8})


def vqa_rad_saved(root: Path) -> Path:
    """The same data as `DatasetDict.save_to_disk` writes it (dataset_dict.json, train/, test/)."""
    import datasets

    datasets.DatasetDict({"train": _dataset(12, 0), "test": _dataset(8, 12)}).save_to_disk(str(root))
    return root


def slake(root: Path) -> Path:
    """train.json (8 en + 4 zh), validate.json, test.json (4 en + 2 zh) and imgs/xmlabN/source.jpg."""
    for split, (n_en, n_zh), first in (("train", (8, 4), 0), ("validate", (2, 2), 100), ("test", (4, 2), 200)):
        records = []
        for k in range(n_en + n_zh):
            zh = k >= n_en
            q, a, kind, content = ZH[k % len(ZH)] if zh else QUESTIONS[k % len(QUESTIONS)]
            img = first + k // 2
            folder = root / "imgs" / f"xmlab{img}"
            if not folder.exists():
                folder.mkdir(parents=True)
                _image(img).save(folder / "source.jpg")
            records.append(
                {
                    "img_id": img,
                    "img_name": f"xmlab{img}/source.jpg",
                    "question": q,
                    "answer": a,
                    "q_lang": "zh" if zh else "en",
                    "location": "Lung",
                    "modality": "CT",
                    "answer_type": kind,
                    "base_type": "vqa",
                    "content_type": content,
                    "triple": ["vhead", "_", "_"],
                    "qid": first * 10 + k,
                }
            )
        (root / f"{split}.json").write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return root


def prompt_completion(root: Path, n: int = 12) -> Path:
    """TRL's conversational prompt/completion layout with an `images` column, as JSON Lines."""
    (root / "images").mkdir(parents=True)
    lines = []
    for i in range(n):
        _image(i).save(root / "images" / f"{i}.png")
        q, a, *_ = QUESTIONS[i % len(QUESTIONS)]
        lines.append(
            {
                "images": [f"{i}.png"],
                "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                "completion": [{"role": "assistant", "content": [{"type": "text", "text": a}]}],
            }
        )
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines), encoding="utf-8")
    return root
