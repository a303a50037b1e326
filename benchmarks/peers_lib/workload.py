"""The one workload all trainers get: a LLaVA-1.5-shaped model, the shapes VQA data in each trainer's format, the settings.

The model is built once by lora_llava.model.tiny and saved as a llava-hf folder
(CLIP at 336 px with patch 14: 576 image tokens per sample, as LLaVA-1.5); the
data is lora_llava.data.synthetic's shapes VQA in LLaVA JSON, converted to
LLaMA-Factory's sharegpt layout (with its dataset_info.json) and to ms-swift's
messages/images JSON lines. The same images, questions and answers reach all
three; each trainer renders them with its own LLaVA-1.5 template.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

# LLaVA-1.5's vicuna_v1 system prompt (lora-llava's and LLaMA-Factory's `llava` template use it by default).
VICUNA_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
LLM_LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class Settings:
    """Everything that must be equal between the trainers; each trainer's command is written from this."""

    steps: int = 12
    warmup: int = 3  # first steps left out of the figures (allocator, first-call caches)
    batch_size: int = 4
    learning_rate: float = 2e-4  # LoRA and projector alike: one rate, as the peers use by default
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    max_length: int = 1024  # above every sample (about 640 tokens): nothing is cut
    max_grad_norm: float = 1.0
    weight_decay: float = 0.0
    seed: int = 0
    threads: int = 1
    logging_steps: int = 1
    # ms-swift's llava1_5_hf template has no default system prompt; True gives it LLaVA-1.5's, as the others have.
    swift_system: bool = True

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Workload:
    root: Path

    @property
    def model(self) -> Path:
        return self.root / "model"

    @property
    def llava_json(self) -> Path:
        return self.root / "data" / "train.json"

    @property
    def images(self) -> Path:
        return self.root / "data" / "images"

    @property
    def llamafactory_dir(self) -> Path:
        return self.root / "data" / "llamafactory"

    @property
    def swift_jsonl(self) -> Path:
        return self.root / "data" / "swift.jsonl"


def prepare(root: Path, n_images: int = 40) -> Workload:
    """Build the model and the data once under `root` (kept between runs: every run reads the same files)."""
    from lora_llava.data.synthetic import make_shapes_dataset
    from lora_llava.model.tiny import make_tiny

    w = Workload(root)
    if not (w.model / "config.json").is_file():
        # 336 px / patch 14 = 24 x 24 = 576 image tokens; widths small enough for one CPU thread.
        make_tiny(w.model, image_size=336, patch_size=14, text_hidden=256, vision_hidden=64, layers=4, seed=0)
    if not w.llava_json.is_file():
        make_shapes_dataset(w.llava_json.parent, n_images=n_images, seed=0, split="train")
    records = json.loads(w.llava_json.read_text(encoding="utf-8"))
    write_llamafactory(records, w)
    write_swift(records, w)
    return w


def _turns(record: dict) -> list[tuple[str, str]]:
    """(role, text) pairs of a LLaVA record, roles as chat messages name them."""
    roles = {"human": "user", "gpt": "assistant"}
    return [(roles[t["from"]], t["value"]) for t in record["conversations"]]


def write_llamafactory(records: list[dict], w: Workload) -> None:
    """sharegpt layout: the LLaVA turns as they are (`<image>` stays in place), absolute image paths."""
    out = w.llamafactory_dir
    out.mkdir(parents=True, exist_ok=True)
    rows = [{"conversations": r["conversations"], "images": [str((w.images / r["image"]).resolve())]} for r in records]
    (out / "shapes.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    info = {
        "shapes": {
            "file_name": "shapes.json",
            "formatting": "sharegpt",
            "columns": {"messages": "conversations", "images": "images"},
            "tags": {"role_tag": "from", "content_tag": "value", "user_tag": "human", "assistant_tag": "gpt"},
        }
    }
    (out / "dataset_info.json").write_text(json.dumps(info, indent=1), encoding="utf-8")


def write_swift(records: list[dict], w: Workload) -> None:
    """messages/images JSON lines. ms-swift's llava template puts "<image>\\n" in place of the tag itself,
    so the newline the LLaVA text has after `<image>` is dropped here (else the prompt would get two)."""
    lines = []
    for r in records:
        messages = [
            {"role": role, "content": text.replace("<image>\n", "<image>", 1) if role == "user" else text}
            for role, text in _turns(r)
        ]
        lines.append(json.dumps({"messages": messages, "images": [str((w.images / r["image"]).resolve())]}))
    w.swift_jsonl.write_text("\n".join(lines) + "\n", encoding="utf-8")
