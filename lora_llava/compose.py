"""Where the model of a recipe comes from, and the projector's own weights file.

A recipe names either a llava-hf checkpoint (`model.name_or_path`) or the two
parts of a new LLaVA-1.5 (`model.vision_tower` + `model.language_model`), and
optionally a stage-1 projector to start from (`model.projector`).
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .errors import ModelError
from .model import load_model, load_processor
from .recipe import ModelConfig

PROJECTOR_FILE = "projector.safetensors"


def load_or_compose(cfg: ModelConfig):
    """(model, processor) for the recipe's model section."""
    if cfg.name_or_path:
        processor = load_processor(cfg.name_or_path, cfg.trust_remote_code, cfg.revision)
        return load_model(cfg), processor
    raise ModelError("model.vision_tower / model.language_model: composing a new LLaVA-1.5 is not available in this version")


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights with llava-hf key names (`linear_1.weight`, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    proj = base.model.multi_modal_projector
    return {k: v.detach().to("cpu").contiguous() for k, v in proj.state_dict().items()}


def save_projector(model, path: Path) -> None:
    save_file(projector_state(model), str(path), metadata={"format": "pt", "module": "multi_modal_projector"})


def find_projector_file(source: str | Path) -> Path:
    """A projector.safetensors, or a stage-1 run folder / composed model folder that holds one."""
    p = Path(source)
    if p.is_file():
        return p
    for candidate in (p / PROJECTOR_FILE, p / "model" / PROJECTOR_FILE):
        if candidate.is_file():
            return candidate
    raise ModelError(f"model.projector: no {PROJECTOR_FILE} in {source}")


def load_projector(model, source: str | Path) -> None:
    """Replace the model's projector by the one saved in `source` (shapes must match)."""
    path = find_projector_file(source)
    state = load_file(str(path))
    proj = model.model.multi_modal_projector
    own = proj.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ModelError(
            f"model.projector: {path} does not fit this model's projector "
            f"({ {k: tuple(v.shape) for k, v in state.items()} } vs { {k: tuple(v.shape) for k, v in own.items()} })"
        )
    ref = next(proj.parameters())
    proj.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in state.items()})
