"""The one place a recipe's model and processor are built: checkpoint or composition, then the stage-1 projector.

Training, inference on a run folder, the merge's parity check and `check` all
call these, so each sees the model and processor training saw.
"""

from __future__ import annotations

from types import SimpleNamespace

from ..errors import ModelError, first_line
from ..recipe.schema import ModelConfig, Recipe
from .compose import add_llava_tokens, llava_config, load_or_compose, processor_for
from .family import next_config
from .load import check_source, load_processor, model_config
from .processor import llava_processor, next_processor
from .projector import load_projector


def load_for_training(recipe: Recipe):
    """Model and processor as the recipe describes them, before anything trains."""
    # The seed makes a composed model's fresh projector reproducible: loading the recipe again rebuilds it.
    model, processor = load_or_compose(recipe.model, seed=recipe.train.seed)
    if recipe.model.projector:
        load_projector(model, recipe.model.projector)
    return model, processor


def load_check_processor(cfg: ModelConfig):
    """The processor training would use, read without any model weights."""
    if cfg.name_or_path:
        processor = load_processor(cfg.name_or_path, cfg.trust_remote_code, cfg.revision)
        return processor_for(model_config(cfg, check_source(cfg.name_or_path)), processor)
    # A composed model: the LLM's tokenizer extended as composing extends it, and the tower's image settings.
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    try:
        tokenizer = AutoTokenizer.from_pretrained(check_source(cfg.language_model, "model.language_model"))
        vision = AutoConfig.from_pretrained(check_source(cfg.vision_tower, "model.vision_tower"))
    except (OSError, ValueError) as e:
        raise ModelError(f"model: cannot read the tokenizer or vision config ({first_line(e)})") from None
    add_llava_tokens(tokenizer)
    if cfg.anyres:
        config = next_config(llava_config(getattr(vision, "vision_config", vision), LlamaConfig(), tokenizer), cfg.image_grid_pinpoints)
        return next_processor(tokenizer, config)
    return llava_processor(tokenizer, SimpleNamespace(vision_config=getattr(vision, "vision_config", vision)))
