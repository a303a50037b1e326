"""An offline, randomly initialised model of the LLaVA-1.5 shape.

Tests and the demo cannot download `llava-hf/llava-1.5-7b-hf`, so this writes a
folder with the same structure at a tiny size: a CLIP vision tower read at
layer -2 with the CLS token dropped, a 2-layer GELU projector, a LLaMA language
model, a LLaMA-style tokenizer (`<s>`, `</s>`, `<unk>`, then `<image>` and
`<pad>` appended as llava-hf does), a LlavaProcessor with LLaVA-1.5 image
settings, and the llava-hf chat template. Nothing here touches the network.

It also writes the inputs of the other ways to get a LLaVA-1.5: a CLIP tower and
a language model as separate folders (`make_tiny_parts`, for composition), and a
checkpoint in the original LLaVA layout (`make_tiny_original`, for `convert`).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from .compose import llava_config
from .processor import build_processor

_WORDS = (
    "a chat between curious user and an artificial intelligence assistant the gives helpful detailed polite answers "
    "to user's questions USER ASSISTANT what is shown in this image picture photo describe there of colour color shape "
    "red green blue yellow white black purple orange circle square triangle star cross yes no one two three four "
    "is are does do it a an on left right top bottom center large small lesion lung heart chest x-ray ct mri scan "
    "normal abnormal fracture organ tissue cell patient answer the question using single word or phrase caption "
    "document table chart text invoice total price product shelf store brand name which how many where why when who "
    "0 1 2 3 4 5 6 7 8 9 . , ? ! : ; ' \" ( ) - _ / + = % abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
)


def build_tokenizer(vocab_size: int = 1024, llava_tokens: bool = True):
    """A LLaMA-style (SentencePiece-like BPE, BOS added) fast tokenizer trained on a small word list.

    `llava_tokens=False` gives the tokenizer of a plain LLM as Vicuna ships it: no `<image>`,
    and `<unk>` doubling as the pad token.
    """
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True, byte_fallback=False))
    tok.normalizer = normalizers.Sequence([])
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
    letters = sorted(set(_WORDS.replace(" ", "")))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=letters + ["▁", "\n"],
        show_progress=False,
    )
    words = _WORDS.split()
    corpus = [" ".join(words[i : i + 12]) for i in range(0, len(words), 3)]
    corpus += [" ".join(p) for p in itertools.permutations(words[:12], 3)]
    corpus += ["<image>\n" + line for line in corpus[:50]]
    tok.train_from_iterator(corpus, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", padding_side="right", model_max_length=4096
    )
    if not llava_tokens:
        hf.pad_token = "<unk>"
        return hf
    # llava-hf appends <image> (32000) and <pad> (32001) after the LLaMA vocabulary.
    hf.add_special_tokens({"additional_special_tokens": ["<image>"]})
    hf.add_special_tokens({"pad_token": "<pad>"})
    return hf


def tiny_configs(vocab_size: int, image_size: int = 336, patch_size: int = 14, seed_dims: dict | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig

    d = {"vision_hidden": 32, "text_hidden": 64, "layers": 2, **(seed_dims or {})}
    vision = CLIPVisionConfig(
        hidden_size=d["vision_hidden"],
        intermediate_size=d["vision_hidden"] * 2,
        num_hidden_layers=d["layers"],
        num_attention_heads=2,
        image_size=image_size,
        patch_size=patch_size,
        projection_dim=d["vision_hidden"],
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=d["text_hidden"],
        intermediate_size=d["text_hidden"] * 2,
        num_hidden_layers=d["layers"],
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=4096,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
    )
    return vision, text


def make_tiny(
    output_dir: str | Path,
    image_size: int = 336,
    patch_size: int = 14,
    seed: int = 0,
    text_hidden: int = 64,
    vision_hidden: int = 32,
    layers: int = 2,
    next: bool = False,
    grid=None,
) -> Path:
    """Write a tiny random LLaVA-1.5-shaped llava-hf folder (model, processor, tokenizer, chat template).

    `next`: a LLaVA-NeXT instead (AnyRes: `grid` as [width, height] pinpoints, default LLaVA-NeXT's at this tile size,
    an `image_newline`, a LlavaNextProcessor).
    """
    from transformers import GenerationConfig

    from .family import LLAVA, NEXT, model_class, next_config
    from .processor import next_processor

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    vision, text = tiny_configs(
        len(tokenizer), image_size, patch_size, {"text_hidden": text_hidden, "vision_hidden": vision_hidden, "layers": layers}
    )
    config = llava_config(vision, text, tokenizer)  # LLaVA-1.5's: CLIP layer -2 without CLS, GELU projector
    if next:
        config = next_config(config, grid)
    torch.manual_seed(seed)
    model = model_class(NEXT if next else LLAVA)(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    model.save_pretrained(out)
    processor = next_processor(tokenizer, config) if next else build_processor(tokenizer, image_size, patch_size)
    processor.save_pretrained(out)
    return out


def _tiny_llm(tokenizer, text_config, seed: int):
    """A random LlamaForCausalLM whose special token ids are the tokenizer's."""
    from transformers import LlamaForCausalLM

    text_config.pad_token_id = tokenizer.pad_token_id
    text_config.bos_token_id = tokenizer.bos_token_id
    text_config.eos_token_id = tokenizer.eos_token_id
    torch.manual_seed(seed)
    return LlamaForCausalLM(text_config)


def _tiny_clip(vision_config, seed: int, full_clip: bool):
    """A random CLIP: the whole CLIPModel (as openai/clip-vit-* ships) or its vision tower alone."""
    from transformers import CLIPConfig, CLIPModel, CLIPVisionModel

    torch.manual_seed(seed)
    if not full_clip:
        return CLIPVisionModel(vision_config)
    h = vision_config.hidden_size
    text = {"hidden_size": h, "intermediate_size": 2 * h, "num_hidden_layers": 1, "num_attention_heads": 2, "vocab_size": 128}
    text |= {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1}  # CLIP's own ids lie outside a 128-token vocabulary
    return CLIPModel(CLIPConfig(vision_config=vision_config.to_dict(), text_config=text, projection_dim=h))


def make_tiny_parts(
    output_dir: str | Path,
    image_size: int = 336,
    patch_size: int = 14,
    seed: int = 0,
    text_hidden: int = 64,
    vision_hidden: int = 32,
    layers: int = 2,
    full_clip: bool = True,
) -> tuple[Path, Path]:
    """Write a tiny CLIP (`clip/`) and a tiny LLaMA with its plain tokenizer (`llm/`); returns both folders.

    These are the two inputs of a composed LLaVA-1.5 (recipe keys model.vision_tower and
    model.language_model). The tokenizer has no `<image>` or `<pad>`: composing adds them.
    """
    out = Path(output_dir)
    tokenizer = build_tokenizer(llava_tokens=False)
    dims = {"text_hidden": text_hidden, "vision_hidden": vision_hidden, "layers": layers}
    vision, text = tiny_configs(len(tokenizer), image_size, patch_size, dims)
    _tiny_clip(vision, seed, full_clip).save_pretrained(out / "clip")
    _tiny_llm(tokenizer, text, seed + 1).save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return out / "clip", out / "llm"


def _inline_tower(vision_config, seed: int, saved_by: str) -> dict[str, torch.Tensor]:
    """A CLIP vision tower's weights named as LLaVA's checkpoints name them under `saved_by`."""
    prefixes = {
        "transformers4": "model.vision_tower.vision_tower.vision_model.",
        "transformers5": "model.vision_tower.vision_tower.",
    }
    if saved_by not in prefixes:
        raise ValueError(f"saved_by must be one of {', '.join(prefixes)}, got {saved_by!r}")
    tower = _tiny_clip(vision_config, seed, full_clip=False)
    return {prefixes[saved_by] + k: v.detach().contiguous() for k, v in tower.state_dict().items()}


def make_tiny_original(
    output_dir: str | Path,
    image_size: int = 336,
    patch_size: int = 14,
    seed: int = 0,
    text_hidden: int = 64,
    vision_hidden: int = 32,
    layers: int = 2,
    saved_by: str | None = None,
    dtype: str = "float32",
    next: bool = False,
) -> Path:
    """Write a tiny checkpoint in the original LLaVA-1.5 layout (`llava/`) and the CLIP it names (`clip/`).

    The layout of liuhaotian/llava-v1.5-7b: `LlavaLlamaForCausalLM`, the LLaMA weights under
    `model.*` and `lm_head`, the projector as `model.mm_projector.0/2`, the vision tower only
    named (`mm_vision_tower`), the plain LLaMA tokenizer. Returns the `llava/` folder.

    `saved_by` "transformers4" / "transformers5" also stores a vision tower inside, as LLaVA's code
    saves one under that version (`vision_tower.vision_tower.vision_model.*` / `vision_tower.vision_tower.*`,
    config key `torch_dtype` / `dtype`); it is seeded apart from `clip/`, so a converter that took
    `clip/` instead gives other logits. `dtype`: the stored weights' dtype.

    `next`: the liuhaotian/llava-v1.6 layout instead (`image_aspect_ratio: anyres`, `mm_patch_merge_type:
    spatial_unpad`, `image_grid_pinpoints` as [width, height] pairs, and `model.image_newline`).
    """
    from safetensors.torch import save_file

    out = Path(output_dir)
    tokenizer = build_tokenizer(llava_tokens=False)
    vision, text = tiny_configs(
        len(tokenizer), image_size, patch_size, {"text_hidden": text_hidden, "vision_hidden": vision_hidden, "layers": layers}
    )
    _tiny_clip(vision, seed, full_clip=True).save_pretrained(out / "clip")
    llm = _tiny_llm(tokenizer, text, seed + 1)
    state = {k: v.contiguous() for k, v in llm.state_dict().items()}
    torch.manual_seed(seed + 2)
    for i, (n_in, n_out) in ((0, (vision_hidden, text_hidden)), (2, (text_hidden, text_hidden))):
        layer = torch.nn.Linear(n_in, n_out)
        state[f"model.mm_projector.{i}.weight"] = layer.weight.detach()
        state[f"model.mm_projector.{i}.bias"] = layer.bias.detach()
    if saved_by is not None:
        state |= _inline_tower(vision, seed + 3, saved_by)
    if next:
        from .family import init_image_newline

        state["model.image_newline"] = init_image_newline(text_hidden, seed + 4)
    state = {k: v.to(getattr(torch, dtype)) for k, v in state.items()}
    llava = out / "llava"
    llava.mkdir(parents=True, exist_ok=True)
    save_file(state, str(llava / "model.safetensors"), metadata={"format": "pt"})
    config = _original_config(text, out / "clip", vision_hidden, saved_by, dtype)
    if next:
        from .family import default_grid

        config |= {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": default_grid(image_size)}
    (llava / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    tokenizer.save_pretrained(llava)
    return llava


def _original_config(text_config, clip: Path, vision_hidden: int, saved_by: str | None, dtype: str) -> dict:
    """config.json of an original LLaVA-1.5 checkpoint: the LLM's keys plus LLaVA's `mm_*` ones."""
    meta = ("architectures", "model_type", "transformers_version", "dtype")
    return {
        **{k: v for k, v in text_config.to_dict().items() if k not in meta},
        "architectures": ["LlavaLlamaForCausalLM"],
        "model_type": "llava_llama",
        ("dtype" if saved_by == "transformers5" else "torch_dtype"): dtype,  # the key each version writes
        "mm_vision_tower": str(clip.resolve()),
        "mm_hidden_size": vision_hidden,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad",
        "tune_mm_mlp_adapter": False,
        "freeze_mm_mlp_adapter": False,
        "use_mm_proj": True,
        "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right",
    }
