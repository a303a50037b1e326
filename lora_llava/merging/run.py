"""`merge`: a finished run -> one llava-hf checkpoint that plain transformers loads, checked and atomic.

Top to bottom: find what the run trained (a LoRA adapter with the projector
inside, or a stage-1 projector) and the base it was trained on; stream the
base checkpoint tensor by tensor into new shards, rebuilding each language-model
weight as training saw it and adding its LoRA delta; write config, generation
config, processor and chat template; run the adapter model and the merged
model on a few samples and compare their logits; write the model card; and
only then rename the folder into place. Memory holds one tensor of the merge
and, during the check, one model at a time.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import LoraLlavaError, OutputError, ParityError
from ..io import atomic_dir, refuse_nonempty
from ..model.load import DTYPES, quantization_config, resolve_dtype
from .options import MAX_SHARD_SIZE, MERGE_MODES, PARITY_SAMPLES
from .parity import ParityReport, check_parity, load_trained_model, relative_tolerance
from .shards import (
    ShardWriter,
    TensorFile,
    TensorSpec,
    checkpoint_files,
    iter_tensors,
    parse_size,
    plan_shards,
    read_specs,
    shard_names,
    write_index,
)
from .source import MergeSource, local_base, read_source
from .weights import MergeRule, added_tensors, check_fit, read_adapter

log = logging.getLogger("lora_llava")


@dataclass(frozen=True)
class MergeReport:
    output: Path
    base: str
    mode: str
    dtype: str
    shards: int
    size_bytes: int
    lora_modules: int
    projector: str  # where the projector of the merged model comes from
    parity: ParityReport | None

    def __str__(self) -> str:
        lines = [
            f"merged {self.lora_modules} LoRA module(s) into {self.base} ({self.mode} weights, {self.dtype}); projector: {self.projector}",
            f"{self.shards} shard(s), {self.size_bytes / 1e9:.2f} GB",
            str(self.parity) if self.parity else "parity check skipped",
            f"written: {self.output}",
        ]
        return "\n".join(lines)


def merge(
    run_dir: str | Path,
    output_dir: str | Path,
    *,
    base: str | None = None,
    merge_into: str = "trained",
    dtype: str | None = None,
    tolerance: float | None = None,
    samples: int = PARITY_SAMPLES,
    check: bool = True,
    overwrite: bool = False,
    max_shard_size: str | int = MAX_SHARD_SIZE,
    recipe: str | Path | None = None,
) -> MergeReport:
    """Merge a run (or PEFT adapter / checkpoint folder) into a standalone llava-hf checkpoint at `output_dir`.

    merge_into: `trained` (the weights the adapter was trained against: dequantized NF4 after
    QLoRA) or `original` (the base checkpoint's weights). dtype: of the merged weights
    (default: the run's). tolerance: max |delta logit| the parity check accepts (default: a
    share of the largest |logit| that depends on the mode, `parity.RELATIVE_TOLERANCE`).
    check: run the parity check. samples: how many samples it uses.
    """
    max_bytes = _check_options(merge_into, dtype, samples, tolerance, max_shard_size)
    src = read_source(Path(run_dir), recipe_file=recipe, base=base)
    out = Path(output_dir)
    check_target(out, overwrite, src)
    out_dtype = DTYPES[dtype] if dtype else resolve_dtype(src.recipe.model.dtype)
    rule, projector_from = merge_rule(src, merge_into, out_dtype)
    base_dir = local_base(src.base, src.recipe.model.revision)

    with atomic_dir(out, "--output", overwrite) as tmp:
        n_shards, size = write_weights(base_dir, tmp, rule, max_bytes)
        parity = _write_release(src, base_dir, tmp, out.name, rule, check, samples, tolerance, merge_into)
    n_lora = len(rule.adapter.lora) if rule.adapter else 0
    return MergeReport(
        out, src.base, merge_into, str(out_dtype).removeprefix("torch."), n_shards, size, n_lora, projector_from, parity
    )


def _check_options(merge_into: str, dtype: str | None, samples: int, tolerance: float | None, max_shard_size: str | int) -> int:
    """Usage errors before any work; returns the shard size in bytes."""
    if merge_into not in MERGE_MODES:
        raise LoraLlavaError(f"merge_into: {merge_into!r} is not one of {', '.join(MERGE_MODES)}")
    if dtype is not None and dtype not in DTYPES:
        raise LoraLlavaError(f"dtype: {dtype!r} is not one of {', '.join(DTYPES)}")
    if samples < 1:
        raise LoraLlavaError(f"samples: must be at least 1, got {samples}")
    if tolerance is not None and not tolerance > 0:
        raise LoraLlavaError(f"tolerance: must be greater than 0, got {tolerance}")
    try:
        return parse_size(max_shard_size)
    except ValueError as e:
        raise LoraLlavaError(f"max_shard_size: {e}") from None


def _write_release(
    src: MergeSource, base_dir: Path, tmp: Path, name: str, rule: MergeRule, check: bool, samples: int, tolerance, mode: str
):
    """Everything beside the weights, the parity check in between (it needs config and processor)."""
    from .modelcard import write_card
    from .release import write_config, write_generation_config, write_processor

    template, system = src.recipe.template, src.recipe.data.system_prompt
    write_config(base_dir, tmp, rule.out_dtype, src.recipe.model)
    processor = write_processor(src.processor_source, tmp, template, system, src.recipe.data.image_aspect)
    write_generation_config(base_dir, tmp, processor.tokenizer, template)
    parity = None
    if check:
        relative = relative_tolerance(mode, rule.quantization, (rule.train_dtype, rule.out_dtype))

        def reference():
            return load_trained_model(src.recipe, src.base, src.adapter_dir, src.projector_file)

        parity = check_parity(reference, tmp, rule.out_dtype, src.recipe, processor, samples, tolerance, relative)
        log.info("%s", parity)
        if not parity.passed:
            raise ParityError(
                f"{src.folder}: merge failed the parity check: {parity}; nothing was written (--tolerance to accept)"
            )
    write_card(tmp, name, src, mode, rule.out_dtype, parity)
    return parity


def merge_rule(src: MergeSource, mode: str, out_dtype: torch.dtype) -> tuple[MergeRule, str]:
    """How each tensor is merged, and where the projector comes from."""
    m = src.recipe.model
    train_dtype = resolve_dtype(m.dtype)
    if m.dtype == "auto" and m.quantization != "none":
        log.warning(
            "the recipe's model.dtype is auto: rebuilding the %s weights in %s, what auto means on this machine; "
            "if training ran elsewhere with another dtype, pass --recipe with model.dtype set",
            m.quantization,
            str(train_dtype).removeprefix("torch."),
        )
    adapter = read_adapter(src.adapter_dir) if src.adapter_dir else None
    projector, projector_from = None, "the base model's"
    if adapter and adapter.projector:
        with TensorFile(adapter.file) as f:
            projector = {suffix: f.get_tensor(key) for suffix, key in adapter.projector.items()}
        projector_from = "trained in the adapter"
    elif src.projector_file:
        projector = load_file(str(src.projector_file))
        projector_from = f"from {src.projector_file}"
    quant = quantization_config(m, train_dtype) if m.quantization == "nf4" else None
    rule = MergeRule(mode, m.quantization, train_dtype, out_dtype, adapter, projector, quant, anyres=m.anyres)
    return rule, projector_from


def write_weights(base_dir: Path, out: Path, rule: MergeRule, max_bytes: int) -> tuple[int, int]:
    """Stream the base checkpoint through `rule` into safetensors shards; returns (shards, bytes)."""
    files = checkpoint_files(base_dir)
    by_file = read_specs(files)
    specs = [s for f in files for s in by_file[f]]
    added = added_tensors(specs, rule.projector, rule.anyres)
    check_fit(specs, rule.adapter, rule.projector, str(base_dir), added)
    extra = [TensorSpec(k, v.dtype, tuple(v.shape)) for k, v in added.items()]
    shards = plan_shards([rule.output_spec(s) for s in specs + extra], max_bytes)
    names = shard_names(len(shards))
    tensors = itertools.chain(  # one at a time, in order; then what the base lacks
        (item for f in files for item in iter_tensors(f, [s.name for s in by_file[f]])), added.items()
    )
    with TensorFile(rule.adapter.file) if rule.adapter else contextlib.nullcontext() as handle:
        for shard, name in zip(shards, names):
            with ShardWriter(out / name, shard) as writer:
                for _ in shard:
                    key, tensor = next(tensors)
                    writer.write(key, rule.apply(key, tensor, handle))
    write_index(out, shards, names)
    return len(shards), sum(s.nbytes for shard in shards for s in shard)


def check_target(out: Path, overwrite: bool, src: MergeSource) -> None:
    """Refuse a target that is a file, a non-empty folder (without overwrite), or overlaps the inputs."""
    resolved = out.resolve()
    for what, path in (("the run", src.folder), ("the base model", Path(src.base))):
        p = path.resolve()
        if path.exists() and (resolved == p or p in resolved.parents or resolved in p.parents):
            raise OutputError(f"--output: {out} overlaps {what} ({path}); choose another folder")
    refuse_nonempty(out, "--output", overwrite)
