"""Several processes (torchrun, accelerate launch): who is who, waiting for each other, errors that name the rank.

The launchers start one process per GPU and tell each its place through
RANK / LOCAL_RANK / WORLD_SIZE; accelerate owns the process group (gloo on
CPU, NCCL on GPUs, DeepSpeed's when it is on) and the Trainer joins the same
one. lora-llava adds what a recipe run needs on top:

* start-up checks run on every rank; only rank 0 then touches the run folder
  while the others wait at a barrier;
* logs, warnings and progress bars come from rank 0 only; errors from any
  rank are printed with `[rank N]` in front and the process group is torn
  down, so the launcher stops the job instead of leaving ranks waiting;
* the launcher's engine (DeepSpeed ZeRO stage, FSDP) is read from the
  variables `accelerate launch` exports, and combinations that cannot train
  are refused before anything loads;
* the shipped launcher configs (package data, `lora_llava/configs/`; the
  repository's `configs/` links there) launch from any folder: their
  DeepSpeed JSON, named relative to the repository root, is looked up among
  the shipped files when the working directory has no such file;
* under ZeRO-3 / FSDP the weights are sharded, so saving the final adapter
  first gathers them on every rank.

`LORA_LLAVA_DEBUG_DUMP_RANK_STATE=DIR` is a debugging aid: at the end of
training each rank writes the trainable weights it holds to
`DIR/rank<N>.safetensors`, to check that data-parallel ranks stayed in step.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import torch

from .errors import LoraLlavaError
from .recipe.schema import Recipe

DUMP_ENV = "LORA_LLAVA_DEBUG_DUMP_RANK_STATE"


def rank() -> int:
    """Global rank of this process (0 when not launched by torchrun / accelerate)."""
    return int(os.environ.get("RANK", 0))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", 1))


def is_main() -> bool:
    return rank() == 0


def _initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def init() -> None:
    """Join the launcher's process group now, so ranks can wait for each other while the run starts.

    accelerate's PartialState is the one the Trainer uses later; it picks the
    backend the way the Trainer would (gloo on CPU, NCCL on GPUs, DeepSpeed's
    communication when the launcher turned DeepSpeed on).
    """
    if world_size() > 1 and not _initialized():
        from accelerate import PartialState

        PartialState(cpu=not torch.cuda.is_available())


def barrier() -> None:
    """Wait until every rank gets here (nothing to wait for in a single process)."""
    if _initialized():
        torch.distributed.barrier()


def shutdown() -> None:
    """Leave the process group: a process that exits without doing so can abort its peers."""
    if _initialized():
        torch.distributed.destroy_process_group()


def name_rank(text: str) -> str:
    """`text` with `[rank N] ` before each line when several processes run, as is."""
    if world_size() <= 1:
        return text
    return "\n".join(f"[rank {rank()}] {line}" for line in text.splitlines() or [""])


def name_accelerator() -> None:
    """Tell DeepSpeed there is no GPU: guessing, it prints a warning on stdout when it is imported (by accelerate
    or transformers, whether or not DeepSpeed is used), which would land in the output of every verb."""
    if "DS_ACCELERATOR" not in os.environ and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"


def quiet_replicas() -> None:
    """For the CLI: output, logs, warnings and progress bars from rank 0 only; N copies of each line help nobody.

    Other ranks keep stderr for errors (which `name_rank` labels) and logged errors.
    """
    if is_main():
        return
    sys.stdout = open(os.devnull, "w")  # stays open for the life of the process
    logging.getLogger("lora_llava").setLevel(logging.ERROR)
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def sum_over_ranks(value: int, device: torch.device | str = "cpu") -> int:
    """The sum of an integer over all ranks (e.g. samples skipped by each rank's data loader)."""
    if not _initialized():
        return value
    t = torch.tensor([value], dtype=torch.long, device=device)
    torch.distributed.all_reduce(t)
    return int(t.item())


# ----------------------------------------------------------------------------- the launcher's engine


CONFIGS = Path(__file__).resolve().parent / "configs"  # package data: the launcher configs shipped with lora-llava
DEEPSPEED_CONFIG_ENV = "ACCELERATE_DEEPSPEED_CONFIG_FILE"


def _flag(name: str) -> bool:
    return os.environ.get(name, "false").strip().lower() in ("1", "true", "yes")


def deepspeed_config() -> Path | None:
    """The DeepSpeed JSON `accelerate launch` named: from the working directory when it is there, else the shipped one.

    accelerate passes the YAML's `deepspeed_config_file` on as written and
    DeepSpeed opens it from the working directory, so the shipped YAMLs'
    `configs/zero2.json` worked only from the repository root. A file of
    that path from the working directory wins: a user's edited copy is used.
    """
    name = os.environ.get(DEEPSPEED_CONFIG_ENV)
    if not name:
        return None
    path = Path(name).expanduser()
    if path.is_absolute() or path.is_file():
        return path.absolute()
    shipped = CONFIGS / path.name
    if (len(path.parts) == 1 or path.parts[:-1] == ("configs",)) and shipped.is_file():
        return shipped
    names = ", ".join(f"configs/{p.name}" for p in sorted(CONFIGS.glob("*.json")))
    raise LoraLlavaError(f"{DEEPSPEED_CONFIG_ENV}: {name} is not a file (from {Path.cwd()}); the shipped ones: {names}")


def use_deepspeed_config() -> None:
    """Point accelerate and DeepSpeed at `deepspeed_config()` by its absolute path; call before TrainingArguments."""
    if _flag("ACCELERATE_USE_DEEPSPEED") and (path := deepspeed_config()) is not None:
        os.environ[DEEPSPEED_CONFIG_ENV] = str(path)


def zero_stage() -> int | None:
    """The DeepSpeed ZeRO stage `accelerate launch` set up for this process; None without DeepSpeed.

    accelerate exports the stage itself when its YAML names one, else the path
    of the DeepSpeed JSON, whose `zero_optimization.stage` decides.
    """
    if not _flag("ACCELERATE_USE_DEEPSPEED"):
        return None
    stage = os.environ.get("ACCELERATE_DEEPSPEED_ZERO_STAGE")
    if stage:
        return int(stage)
    path = deepspeed_config()
    if path is None:
        return 0
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise LoraLlavaError(f"{DEEPSPEED_CONFIG_ENV}: cannot read {path} ({e})") from None
    return int(config.get("zero_optimization", {}).get("stage", 0))


def fsdp_enabled() -> bool:
    """True when `accelerate launch` runs this process under FSDP."""
    return _flag("ACCELERATE_USE_FSDP")


def check_engine(recipe: Recipe) -> None:
    """Refuse, in one line and before anything loads, what the launcher's engine cannot train."""
    q = recipe.model.quantization
    if recipe.stage == "align" and (zero_stage() == 3 or fsdp_enabled()):
        raise LoraLlavaError(
            "stage: align trains only the projector on a frozen model, which every GPU holds whole; "
            "launch it with data parallel (configs/ddp.yaml) or ZeRO-2 (configs/zero2.yaml), not ZeRO-3 or FSDP"
        )
    if q != "none" and zero_stage() == 3:
        raise LoraLlavaError(
            f"model.quantization: {q} cannot be trained under DeepSpeed ZeRO-3, which partitions every weight and "
            "breaks bitsandbytes' quantized layers; use ZeRO-2 (configs/zero2.yaml) or FSDP-QLoRA (configs/fsdp_qlora.yaml), "
            "or model.quantization: none with ZeRO-3"
        )
    if q == "int8" and fsdp_enabled():
        raise LoraLlavaError(
            "model.quantization: int8 weights cannot be sharded by FSDP; use nf4 (FSDP-QLoRA, configs/fsdp_qlora.yaml) or none"
        )


def shards_weights(trainer) -> bool:
    """True when no single rank holds whole weights: DeepSpeed ZeRO-3 or FSDP."""
    if getattr(trainer, "is_fsdp_enabled", False):
        return True
    plugin = getattr(trainer.accelerator.state, "deepspeed_plugin", None)
    return plugin is not None and plugin.zero_stage == 3


def gathered_state_dict(trainer) -> dict[str, torch.Tensor] | None:
    """The whole model's weights on rank 0 when they are sharded (every rank must call this); None otherwise."""
    if not shards_weights(trainer):
        return None
    return trainer.accelerator.get_state_dict(trainer.model_wrapped)


def dump_rank_state(model) -> Path | None:
    """Debugging aid: with LORA_LLAVA_DEBUG_DUMP_RANK_STATE=DIR, write this rank's trainable weights to DIR."""
    folder = os.environ.get(DUMP_ENV)
    if not folder:
        return None
    from safetensors.torch import save_file

    path = Path(folder) / f"rank{rank()}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {n: p.detach().to("cpu").contiguous() for n, p in model.named_parameters() if p.requires_grad}
    save_file(state, str(path))
    return path
