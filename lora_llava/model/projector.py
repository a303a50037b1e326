"""The projector's weights: their names in every file they come from, reading and writing its own file.

A stage-1 run writes the projector alone (`projector.safetensors`); stage 2 and
merges read it back from that file, from a llava-hf folder (sharded or not), or
from LLaVA's own `mm_projector.bin`. The module's name inside llava-hf models,
`multi_modal_projector`, is declared here once for LoRA targeting and merging.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..errors import ModelError, describe

PROJECTOR_MODULE = "multi_modal_projector"  # LlavaForConditionalGeneration.model.multi_modal_projector


PROJECTOR_FILE = "projector.safetensors"
NEWLINE = "image_newline"  # LlavaNextModel.image_newline: a parameter, not a module


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights with llava-hf key names (`linear_1.weight`, ...), and an AnyRes model's `image_newline`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    proj = base.model.multi_modal_projector
    state = {k: v.detach().to("cpu").contiguous() for k, v in proj.state_dict().items()}
    if getattr(base.model, NEWLINE, None) is not None:
        state[NEWLINE] = getattr(base.model, NEWLINE).detach().to("cpu").contiguous()
    return state


def save_projector(model, path: Path) -> None:
    save_file(projector_state(model), str(path), metadata={"format": "pt", "module": PROJECTOR_MODULE})


# Names a projector has in the files it can come from: llava-hf folders (saved and in-memory
# layouts) and LLaVA's own stage-1 output (`mm_projector.bin`, Sequential indices 0 and 2).
_PROJECTOR_PREFIXES = (f"{PROJECTOR_MODULE}.", f"model.{PROJECTOR_MODULE}.")


_ORIGINAL_NAMES = {"model.mm_projector.0.": "linear_1.", "model.mm_projector.2.": "linear_2."}


def find_projector_file(source: str | Path) -> Path:
    """A projector file, or the folder that holds one: a stage-1 run, a llava-hf model folder, LLaVA's mm_projector.bin."""
    p = Path(source)
    if p.is_file():
        return p
    candidates = [p / PROJECTOR_FILE, p / "model" / PROJECTOR_FILE, p / "mm_projector.bin"]
    candidates += [p / "model.safetensors.index.json", p / "model.safetensors"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise ModelError(f"model.projector: no {PROJECTOR_FILE}, mm_projector.bin or llava-hf weights in {source}")


def _projector_name(key: str) -> str | None:
    """`linear_1.weight` etc. for a projector weight under any of its known names; None for other weights.

    AnyRes models keep `image_newline` beside the projector: it trains with it and travels in its file.
    """
    if key.startswith(("linear_1.", "linear_2.")):
        return key
    if key in (NEWLINE, f"model.{NEWLINE}"):
        return NEWLINE
    for prefix, new in [(p, "") for p in _PROJECTOR_PREFIXES] + list(_ORIGINAL_NAMES.items()):
        if key.startswith(prefix):
            return new + key[len(prefix) :]
    return None


def read_projector(source: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The projector weights found at `source`, with llava-hf names (`linear_1.weight`, ...).

    Only the projector's tensors are read from a model's weights file, not the whole model.
    """


    path = find_projector_file(source)
    files = [path]
    if path.name.endswith(".index.json"):  # a sharded llava-hf folder: the shard(s) holding the projector
        index = json.loads(path.read_text(encoding="utf-8"))["weight_map"]
        files = [path.parent / f for f in sorted({f for k, f in index.items() if _projector_name(k)})]
    state = {}
    try:
        for f in files:
            if f.suffix == ".safetensors":
                with safe_open(str(f), framework="pt") as handle:
                    state.update({_projector_name(k): handle.get_tensor(k) for k in handle.keys() if _projector_name(k)})
            else:
                raw = torch.load(f, map_location="cpu", weights_only=True)
                state.update({_projector_name(k): v for k, v in raw.items() if _projector_name(k)})
    except Exception as e:  # a truncated or foreign file: name it
        raise ModelError(f"model.projector: cannot read {f} ({describe(e)})") from None
    return path, state


def load_projector(model, source: str | Path) -> None:
    """Replace the model's projector by the one saved in `source` (shapes must match)."""
    path, state = read_projector(source)
    newline = state.pop(NEWLINE, None)
    own_newline = getattr(model.model, NEWLINE, None)
    if newline is not None and own_newline is not None:  # a LLaVA-1.5 projector leaves a HD model's newline as drawn
        if newline.shape != own_newline.shape:
            raise ModelError(f"model.projector: {path}: image_newline {tuple(newline.shape)} does not fit {tuple(own_newline.shape)}")
        own_newline.data = newline.to(own_newline.device, own_newline.dtype)
    proj = model.model.multi_modal_projector
    own = proj.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ModelError(
            f"model.projector: {path} does not fit this model's projector "
            f"({ {k: tuple(v.shape) for k, v in state.items()} } vs { {k: tuple(v.shape) for k, v in own.items()} })"
        )
    ref = next(proj.parameters())
    proj.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in state.items()})
