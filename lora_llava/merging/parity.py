"""The parity check: does the merged checkpoint compute what the adapter model as trained computes?

Both models run on the same few samples (the recipe's eval data, else its
training data, else generated ones), one model at a time so that memory holds
one model, never two. The figures compare logits at every token position:
max |delta|, mean |delta|, and how often the top-1 token agrees.
"""

from __future__ import annotations

import ctypes
import dataclasses
import gc
import logging
import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..data.dataset import LlavaDataset, collate
from ..errors import DataError
from ..recipe.schema import DatasetSpec, Recipe

log = logging.getLogger("lora_llava")

# Default tolerance per merge mode, as a share of the reference model's largest |logit|
# (logits of a 13B model reach ~30, those of a random tiny model ~1). `trained` rebuilds the
# exact weights the adapter saw, so only rounding remains (W + BA rounded to 16 bits, summation
# order); `original` after QLoRA also carries the quantization gap, which is real and larger:
# there the check catches gross errors only (a wrong base, a dropped projector).
RELATIVE_TOLERANCE = {"fp32": 1e-3, "16-bit": 5e-2, "original after quantization": 0.25}


def relative_tolerance(mode: str, quantization: str, dtypes: tuple[torch.dtype, ...]) -> float:
    """The default tolerance of a merge, relative to the largest |logit| of the model as trained."""
    if mode == "original" and quantization != "none":
        return RELATIVE_TOLERANCE["original after quantization"]
    return RELATIVE_TOLERANCE["16-bit" if any(d != torch.float32 for d in dtypes) else "fp32"]


@dataclass(frozen=True)
class ParityReport:
    samples: int
    positions: int
    max_abs: float
    mean_abs: float
    top1: float  # share of positions where both models pick the same token
    tolerance: float  # max |delta logit| accepted
    logit_scale: float  # largest |logit| of the model as trained
    source: str  # where the samples came from

    @property
    def passed(self) -> bool:
        return math.isfinite(self.max_abs) and self.max_abs <= self.tolerance

    def __str__(self) -> str:
        return (
            f"parity on {self.samples} sample(s) from {self.source} ({self.positions} positions): "
            f"max |delta logit| {self.max_abs:.3g}, mean {self.mean_abs:.3g}, "
            f"top-1 agreement {100 * self.top1:.2f}% (tolerance {self.tolerance:.3g}; largest |logit| {self.logit_scale:.3g})"
        )


def _encode_first(specs: tuple[DatasetSpec, ...], recipe: Recipe, processor, n: int) -> list[dict]:
    """The first `n` samples of `specs` that encode, as single-sample batches."""
    ds = LlavaDataset.for_recipe(recipe, processor, specs)
    batches = []
    for i in range(min(len(ds), 20 * n)):
        try:
            enc, pixels = ds.encode_sample(ds.sample(i))
        except DataError as e:
            log.info("parity: skipping %s", e)
            continue
        item = {"input_ids": torch.tensor(enc.input_ids), "labels": torch.tensor(enc.labels), **(pixels or {})}
        batches.append(collate([item], processor.tokenizer.pad_token_id))
        if len(batches) == n:
            break
    return batches


def parity_batches(recipe: Recipe, processor, n: int, workdir: Path) -> tuple[list[dict], str]:
    """Samples for the check: eval data, else training data, else generated shapes; and where they came from."""
    for label, specs in (("the eval data", recipe.data.eval), ("the training data", recipe.data.train)):
        if not specs or not all(Path(s.path).exists() for s in specs):
            continue
        try:
            batches = _encode_first(specs, recipe, processor, n)
        except DataError as e:
            log.warning("parity: cannot use %s (%s); trying other samples", label, e)
            continue
        if batches:
            return batches, label
    from ..data.synthetic import make_shapes_dataset

    path = make_shapes_dataset(workdir / "parity-data", n_images=n, seed=0, split="parity")
    spec = DatasetSpec(path=str(path), image_folder=str(workdir / "parity-data" / "images"))
    return _encode_first((spec,), recipe, processor, n), "generated samples"


def _input_device_and_dtype(model) -> tuple[torch.device, torch.dtype]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    vision = next(base.model.vision_tower.parameters())
    device = vision.device if vision.device.type != "meta" else torch.device("cpu")
    return device, vision.dtype


@torch.no_grad()
def logits_of(load: Callable[[], torch.nn.Module], batches: list[dict]) -> list[torch.Tensor]:
    """Load a model, take its logits (fp32, CPU) on every batch, and free it before returning."""
    model = load()
    model.eval()
    device, dtype = _input_device_and_dtype(model)
    out = []
    for batch in batches:
        inputs = {"input_ids": batch["input_ids"].to(device), "attention_mask": batch["attention_mask"].to(device)}
        if "pixel_values" in batch:
            inputs["pixel_values"] = batch["pixel_values"].to(device, dtype)
        if "image_sizes" in batch:  # AnyRes
            inputs["image_sizes"] = batch["image_sizes"].to(device)
        logits = model(**inputs).logits.float().cpu()
        out.append(logits[batch["attention_mask"].bool()])
    del model
    release_memory()
    return out


def release_memory() -> None:
    """Free what a dropped model held, and hand it back to the system so that the next model fits."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:  # glibc keeps freed blocks in its arenas (1.6 GiB after the 4-bit 1.4B model of benchmarks/merge_memory.py)
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to trim
        pass


def compare(
    reference: list[torch.Tensor], merged: list[torch.Tensor], tolerance: float | None, relative: float, source: str
) -> ParityReport:
    """Logit differences; the tolerance is `tolerance`, else `relative` x the largest reference |logit|."""
    ref, new = torch.cat(reference), torch.cat(merged)
    delta = (new - ref).abs()
    scale = float(ref.abs().max())
    return ParityReport(
        samples=len(reference),
        positions=ref.shape[0],
        max_abs=float(delta.max()),
        mean_abs=float(delta.mean()),
        top1=float((new.argmax(-1) == ref.argmax(-1)).float().mean()),
        tolerance=tolerance if tolerance is not None else relative * scale,
        logit_scale=scale,
        source=source,
    )


def load_trained_model(recipe: Recipe, base: str, adapter_dir: Path | None, projector_file: Path | None):
    """The model as trained: the recipe's model (dtype, quantization, stage-1 projector), then the adapter or projector."""
    from ..model.build import load_for_training
    from ..model.projector import load_projector

    run_recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path=base))
    model, _ = load_for_training(run_recipe)
    if adapter_dir is not None:
        from peft import PeftModel

        return PeftModel.from_pretrained(model, adapter_dir)
    if projector_file is not None:
        load_projector(model, projector_file)
    return model


def load_merged_model(folder: Path, dtype: torch.dtype, offload_dir: Path):
    """The merged checkpoint as transformers loads it; what does not fit in memory is read from disk."""
    from transformers import AutoConfig

    from ..model.family import family_of, model_class

    cls = model_class(family_of(AutoConfig.from_pretrained(folder)))
    return cls.from_pretrained(folder, dtype=dtype, device_map="auto", offload_folder=str(offload_dir))


def check_parity(
    load_reference: Callable[[], torch.nn.Module],
    merged_dir: Path,
    dtype: torch.dtype,
    recipe: Recipe,
    processor,
    n_samples: int,
    tolerance: float | None,
    relative: float,
) -> ParityReport:
    """Run the adapter model, then the merged model, on the same samples and compare their logits."""
    with tempfile.TemporaryDirectory(prefix="lora-llava-parity-") as work:
        release_memory()  # what the merge itself freed
        batches, source = parity_batches(recipe, processor, n_samples, Path(work))
        if not batches:
            raise DataError("parity check: no sample could be encoded for the check")
        reference = logits_of(load_reference, batches)
        merged = logits_of(lambda: load_merged_model(merged_dir, dtype, Path(work) / "offload"), batches)
    return compare(reference, merged, tolerance, relative, source)
