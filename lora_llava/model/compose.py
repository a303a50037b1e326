"""Where the model of a recipe comes from, and the projector's own weights file.

A recipe names either a llava-hf checkpoint (`model.name_or_path`) or the two
parts of a new LLaVA-1.5 (`model.vision_tower` + `model.language_model`), and
optionally a stage-1 projector to start from (`model.projector`).

Composing follows LLaVA-1.5: CLIP read at layer -2 without its CLS token, a
fresh `Linear -> GELU -> Linear` projector (PyTorch's default init, as LLaVA
builds it), and the tokenizer extended the way llava-hf checkpoints are:
`<image>` and `<pad>` appended, the vocabulary padded to a multiple of 64
(32000 -> 32064 for Vicuna), new rows starting at the mean of the existing ones
so that the new tokens have no influence before training.

Memory: the parts are read once in 16-bit on the CPU (about 14 GB of RAM for
CLIP-L + a 7B LLM) and handed to `from_pretrained` as a state dict, which
places them on the GPU and, for QLoRA, quantizes the LLM's linear layers on the
way. No composed copy is written to disk (a 7B copy is 14 GB and a minute of
writing and reading); the composition is deterministic (the projector's
initialisation is seeded by train.seed), so loading a run's recipe again
rebuilds exactly the model the run started from.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..errors import ModelError, first_line
from ..recipe.schema import ModelConfig
from .family import family_of, init_image_newline, model_class, next_config
from .load import (
    check_source,
    freeze_for_training,
    load_model,
    load_processor,
    loading_kwargs,
    pickles_named,
    quiet_transformers,
    resolve_dtype,
)
from .processor import llava_processor, next_processor

IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
VOCAB_MULTIPLE = 64  # llava-hf pads the vocabulary to a multiple of 64 (32064 rows for Vicuna's 32000 + 2)
EMBED_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def load_or_compose(cfg: ModelConfig, seed: int = 0):
    """(model, processor) for the recipe's model section: a llava-hf checkpoint, or a new composition."""
    if cfg.name_or_path:
        processor = load_processor(cfg.name_or_path, cfg.trust_remote_code, cfg.revision)
        model = load_model(cfg, seed=seed)
        return model, processor_for(model.config, processor)
    return compose_model(cfg, seed)


def processor_for(config, processor):
    """The processor of a NeXT model made from a LLaVA-1.5 (`model.anyres`): the 1.5 tokenizer and template, AnyRes images."""
    from .family import NEXT, family_of

    if family_of(config) == NEXT and not hasattr(processor.image_processor, "image_grid_pinpoints"):
        return next_processor(processor.tokenizer, config, processor.chat_template)
    return processor


def compose_model(cfg: ModelConfig, seed: int = 0):
    """A new LLaVA-1.5 from `cfg.vision_tower` (CLIP) and `cfg.language_model` (LLaMA family), with a fresh projector."""
    dtype = resolve_dtype(cfg.dtype)
    vision_state, vision_config = load_vision_tower(cfg.vision_tower, dtype, cfg.trust_remote_code)
    text_state, text_config, tokenizer = load_language_model(cfg.language_model, dtype, cfg.trust_remote_code)
    n_original = add_llava_tokens(tokenizer)
    config = llava_config(vision_config, text_config, tokenizer)
    state = {**vision_state, **text_state, **fresh_projector(config, seed, dtype)}
    config.text_config.vocab_size = resize_vocab(state, n_original, len(tokenizer))
    if cfg.anyres:  # LLaVA-1.5-HD from the start: the same parts, AnyRes tiles, a seeded image_newline
        config = next_config(config, cfg.image_grid_pinpoints)
        state["model.image_newline"] = init_image_newline(config.text_config.hidden_size, seed, dtype)
        return assemble(config, state, cfg), next_processor(tokenizer, config)
    return assemble(config, state, cfg), llava_processor(tokenizer, config)


def _model_type(src: str, key: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: cannot read the config of {src} ({first_line(e)})") from None


def load_vision_tower(source: str, dtype: torch.dtype, trust_remote_code: bool = False, key: str = "model.vision_tower"):
    """CLIP's vision weights (keys `model.vision_tower.*`) and config, from a CLIPVisionModel or a whole CLIPModel."""
    from transformers import CLIPVisionModel

    src = check_source(source, key)
    kind = _model_type(src, key, trust_remote_code)
    if kind not in ("clip", "clip_vision_model"):
        raise ModelError(
            f"{key}: {source} is a {kind!r} checkpoint; LLaVA-1.5 uses a CLIP vision tower (clip or clip_vision_model)"
        )
    with quiet_transformers(), pickles_named(src, key):
        tower, info = CLIPVisionModel.from_pretrained(src, dtype=dtype, output_loading_info=True)
    if info["missing_keys"]:
        raise ModelError(f"{key}: {source} lacks vision weights ({sorted(info['missing_keys'])[:3]} ...)")
    state = {f"model.vision_tower.{k}": v for k, v in tower.state_dict().items()}
    return state, tower.config


def load_language_model(source: str, dtype: torch.dtype, trust_remote_code: bool = False, key: str = "model.language_model"):
    """The LLM's weights renamed into LLaVA's tree (`model.language_model.*`, `lm_head`), its config and tokenizer."""
    from transformers import AutoModelForCausalLM

    src = check_source(source, key)
    kind = _model_type(src, key, trust_remote_code)
    if kind.startswith(("clip", "llava", "siglip")):
        raise ModelError(f"{key}: {source} is a {kind!r} checkpoint, not a language model")
    tokenizer = load_tokenizer(src, key, trust_remote_code)  # before the weights: it fails faster
    try:
        with quiet_transformers(), pickles_named(src, key):
            llm = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: cannot load {source} ({first_line(e)})") from None
    state = {}
    for k, v in llm.state_dict().items():
        if not k.startswith(("model.", "lm_head.")):
            raise ModelError(f"{key}: {source} is not a LLaMA-family causal LM (weight {k} is neither model.* nor lm_head.*)")
        state["model.language_model." + k[len("model.") :] if k.startswith("model.") else k] = v
    return state, llm.config, tokenizer


def load_tokenizer(src: str, key: str, trust_remote_code: bool = False):
    """The tokenizer of a checkpoint; a SentencePiece-only one (Vicuna, LLaVA) says which packages it needs."""
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(src, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError) as e:
        if not _importable("sentencepiece", "google.protobuf") and not (Path(src) / "tokenizer.json").is_file():
            hint = "; reading a tokenizer.model needs `pip install sentencepiece protobuf`"
        else:
            hint = ""
        raise ModelError(f"{key}: cannot load the tokenizer of {src} ({first_line(e)}){hint}") from None


def _importable(*modules: str) -> bool:
    import importlib

    try:
        for m in modules:
            importlib.import_module(m)
    except ImportError:
        return False
    return True


def add_llava_tokens(tokenizer) -> int:
    """Append `<image>` and, unless the tokenizer has a pad token of its own, `<pad>`; returns the size before."""
    from tokenizers import AddedToken

    n_original = len(tokenizer)
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    # Vicuna pads with <unk> (or not at all); llava-hf gives padding its own token, id 32001.
    if tokenizer.pad_token is None or tokenizer.pad_token in (tokenizer.unk_token, tokenizer.eos_token, tokenizer.bos_token):
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return n_original


def resize_vocab(state: dict[str, torch.Tensor], n_original: int, n_tokens: int) -> int:
    """Grow the input and output embeddings in `state` to hold `n_tokens` (rounded up to 64); returns the new row count.

    Every row from `n_original` on (the added tokens and the padding rows) starts at the mean of
    the original rows: an added token's logit is then the average logit, neither favoured nor
    suppressed, and `<image>`'s embedding is never used (image features replace it).
    """
    rows = None
    for key in EMBED_KEYS:
        w = state[key]
        if w.shape[0] < n_original:
            raise ModelError(f"model.language_model: the tokenizer has {n_original} tokens but {key} only {w.shape[0]} rows")
        rows = -(-max(w.shape[0], n_tokens) // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
        grown = torch.empty(rows, w.shape[1], dtype=w.dtype)
        grown[: w.shape[0]] = w
        grown[n_original:] = w[:n_original].float().mean(dim=0).to(w.dtype)
        state[key] = grown
    return rows


def llava_config(vision_config, text_config, tokenizer, feature_layer: int = -2, strategy: str = "default"):
    """LlavaConfig of LLaVA-1.5: CLIP layer -2 without CLS, GELU projector, the tokenizer's special ids."""
    from transformers import LlavaConfig

    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(vision_config.image_size // vision_config.patch_size) ** 2,
        projector_hidden_act="gelu",
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    config.text_config.pad_token_id = tokenizer.pad_token_id
    config.text_config.bos_token_id = tokenizer.bos_token_id
    config.text_config.eos_token_id = tokenizer.eos_token_id
    return config


def fresh_projector(config, seed: int, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """A new projector (keys `model.multi_modal_projector.*`), initialised like LLaVA's: nn.Linear defaults, seeded."""
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        projector = LlavaMultiModalProjector(config)
    return {f"model.multi_modal_projector.{k}": v.detach().to(dtype) for k, v in projector.state_dict().items()}


def assemble(config, state: dict[str, torch.Tensor], cfg: ModelConfig, on_cpu: bool = False):
    """LlavaForConditionalGeneration from a complete state dict, with the recipe's dtype, quantization and device."""
    from transformers import GenerationConfig

    kwargs = dict(loading_kwargs(cfg, on_cpu), config=config, state_dict=state)
    with quiet_transformers():
        model, info = model_class(family_of(config)).from_pretrained(None, output_loading_info=True, **kwargs)
    wrong = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + sorted(map(str, info["mismatched_keys"]))
    if wrong:  # the key mapping above is incomplete for this checkpoint: a bug, not a user error
        raise RuntimeError(f"composed weights do not fit LlavaForConditionalGeneration: {wrong[:5]}")
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )
    return freeze_for_training(model)


# ----------------------------------------------------------------------------- the projector's own file


