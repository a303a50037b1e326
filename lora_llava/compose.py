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

import contextlib
from pathlib import Path

import torch
from safetensors.torch import save_file

from .errors import ModelError
from .model import check_source, device_map, load_model, load_processor, quantization_config, resolve_dtype
from .recipe import ModelConfig

PROJECTOR_FILE = "projector.safetensors"
IMAGE_TOKEN, PAD_TOKEN = "<image>", "<pad>"
VOCAB_MULTIPLE = 64  # llava-hf pads the vocabulary to a multiple of 64 (32064 rows for Vicuna's 32000 + 2)
EMBED_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def load_or_compose(cfg: ModelConfig, seed: int = 0):
    """(model, processor) for the recipe's model section: a llava-hf checkpoint, or a new composition."""
    if cfg.name_or_path:
        processor = load_processor(cfg.name_or_path, cfg.trust_remote_code, cfg.revision)
        return load_model(cfg), processor
    return compose_model(cfg, seed)


def compose_model(cfg: ModelConfig, seed: int = 0):
    """A new LLaVA-1.5 from `cfg.vision_tower` (CLIP) and `cfg.language_model` (LLaMA family), with a fresh projector."""
    dtype = resolve_dtype(cfg.dtype)
    vision_state, vision_config = load_vision_tower(cfg.vision_tower, dtype, cfg.trust_remote_code)
    text_state, text_config, tokenizer = load_language_model(cfg.language_model, dtype, cfg.trust_remote_code)
    n_original = add_llava_tokens(tokenizer)
    config = llava_config(vision_config, text_config, tokenizer)
    state = {**vision_state, **text_state, **fresh_projector(config, seed, dtype)}
    config.text_config.vocab_size = resize_vocab(state, n_original, len(tokenizer))
    return assemble(config, state, cfg), llava_processor(tokenizer, config)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' loading report: reading CLIP's vision half lists every text-tower weight."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _model_type(src: str, key: str, trust_remote_code: bool) -> str:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(src, trust_remote_code=trust_remote_code).model_type
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: cannot read the config of {src} ({str(e).strip().splitlines()[0]})") from None


def load_vision_tower(source: str, dtype: torch.dtype, trust_remote_code: bool = False, key: str = "model.vision_tower"):
    """CLIP's vision weights (keys `model.vision_tower.*`) and config, from a CLIPVisionModel or a whole CLIPModel."""
    from transformers import CLIPVisionModel

    src = check_source(source, key)
    kind = _model_type(src, key, trust_remote_code)
    if kind not in ("clip", "clip_vision_model"):
        raise ModelError(
            f"{key}: {source} is a {kind!r} checkpoint; LLaVA-1.5 uses a CLIP vision tower (clip or clip_vision_model)"
        )
    with quiet_transformers():
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
        with quiet_transformers():
            llm = AutoModelForCausalLM.from_pretrained(src, dtype=dtype, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        raise ModelError(f"{key}: cannot load {source} ({str(e).strip().splitlines()[0]})") from None
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
        raise ModelError(f"{key}: cannot load the tokenizer of {src} ({str(e).strip().splitlines()[0]}){hint}") from None


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
    from transformers import GenerationConfig, LlavaForConditionalGeneration

    dtype = resolve_dtype(cfg.dtype)
    kwargs = dict(config=config, state_dict=state, dtype=dtype, attn_implementation=cfg.attn_implementation)
    quant = quantization_config(cfg, dtype)
    if quant is not None:
        kwargs["quantization_config"] = quant
    dm = None if on_cpu else device_map()
    if dm is not None or quant is not None:
        kwargs["device_map"] = dm or {"": "cpu"}
    with quiet_transformers():
        model, info = LlavaForConditionalGeneration.from_pretrained(None, output_loading_info=True, **kwargs)
    wrong = sorted(info["missing_keys"]) + sorted(info["unexpected_keys"]) + sorted(map(str, info["mismatched_keys"]))
    if wrong:  # the key mapping above is incomplete for this checkpoint: a bug, not a user error
        raise RuntimeError(f"composed weights do not fit LlavaForConditionalGeneration: {wrong[:5]}")
    text = config.text_config
    model.generation_config = GenerationConfig(
        bos_token_id=text.bos_token_id, eos_token_id=text.eos_token_id, pad_token_id=text.pad_token_id
    )
    model.config.use_cache = False
    model.requires_grad_(False)
    return model


def llava_processor(tokenizer, config, do_pad: bool = True):
    """LlavaProcessor with LLaVA-1.5's image settings at the tower's resolution (336 px -> 576 tokens)."""
    from .tiny import build_processor

    vision = config.vision_config
    return build_processor(tokenizer, vision.image_size, vision.patch_size, do_pad=do_pad)


# ----------------------------------------------------------------------------- the projector's own file


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights with llava-hf key names (`linear_1.weight`, ...)."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    proj = base.model.multi_modal_projector
    return {k: v.detach().to("cpu").contiguous() for k, v in proj.state_dict().items()}


def save_projector(model, path: Path) -> None:
    save_file(projector_state(model), str(path), metadata={"format": "pt", "module": "multi_modal_projector"})


# Names a projector has in the files it can come from: llava-hf folders (saved and in-memory
# layouts) and LLaVA's own stage-1 output (`mm_projector.bin`, Sequential indices 0 and 2).
_PROJECTOR_PREFIXES = ("multi_modal_projector.", "model.multi_modal_projector.")
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
    """`linear_1.weight` etc. for a projector weight under any of its known names; None for other weights."""
    if key.startswith(("linear_1.", "linear_2.")):
        return key
    for prefix, new in [(p, "") for p in _PROJECTOR_PREFIXES] + list(_ORIGINAL_NAMES.items()):
        if key.startswith(prefix):
            return new + key[len(prefix) :]
    return None


def read_projector(source: str | Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The projector weights found at `source`, with llava-hf names (`linear_1.weight`, ...).

    Only the projector's tensors are read from a model's weights file, not the whole model.
    """
    import json

    from safetensors import safe_open

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
        raise ModelError(f"model.projector: cannot read {f} ({type(e).__name__}: {e})") from None
    return path, state


def load_projector(model, source: str | Path) -> None:
    """Replace the model's projector by the one saved in `source` (shapes must match)."""
    path, state = read_projector(source)
    proj = model.model.multi_modal_projector
    own = proj.state_dict()
    if set(state) != set(own) or any(state[k].shape != own[k].shape for k in own):
        raise ModelError(
            f"model.projector: {path} does not fit this model's projector "
            f"({ {k: tuple(v.shape) for k, v in state.items()} } vs { {k: tuple(v.shape) for k, v in own.items()} })"
        )
    ref = next(proj.parameters())
    proj.load_state_dict({k: v.to(ref.device, ref.dtype) for k, v in state.items()})
