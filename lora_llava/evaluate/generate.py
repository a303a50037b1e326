"""Answers from a LLaVA-1.5 model: a llava-hf folder or hub id, a run folder (base + adapter), a merged folder.

A run folder is rebuilt exactly as it was trained: the base model of its
`recipe.yaml` with the same dtype and quantization (PEFT reproduces the
training-time model only then), then the adapter, and prompts in the run's
template. A plain model folder gets `vicuna_v1`, the template LLaVA-1.5 was
trained with and that its evaluation scripts use (llava-hf's chat template
drops the system prompt), unless the folder holds a `recipe.yaml` (a merged
run) or the caller names a template.

Prompts are built as training builds them (`generation_prompt`, then
`encode`: BOS, each `<image>` expanded to the image's tokens) and images are
padded to a square the same way. Batches are padded on the LEFT so that every
row's prompt ends where generation starts. Greedy decoding by default, as in
LLaVA-1.5's evaluation.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data.dataset import tokens_per_image
from ..data.encode import encode, image_token_counts
from ..data.formats import IMAGE_TAG
from ..data.images import image_inputs, open_image
from ..data.templates import IMAGE_CHUNK_TEMPLATES, TEMPLATES, Rendered, generation_prompt, stop_token
from ..errors import DataError, LoraLlavaError, ModelError
from ..recipe.parse import load_recipe
from ..recipe.schema import ModelConfig, checkpoint_template
from ..runs import RunPaths
from .sampling import GENERATION_BATCH, Sampling

NO_LIMIT = 10**9  # prompts are never truncated: a cut prompt asks a different question


@dataclass(frozen=True)
class Request:
    """One prompt: the conversation so far, ending with the user's turn, and its images."""

    turns: tuple[tuple[str, str], ...]
    images: tuple[Image.Image, ...] = ()
    system: str | None = None  # replaces the predictor's system prompt (an API client's system message)


@dataclass
class Predictor:
    """A model ready to answer, with the template and image handling it was trained with."""

    model: Any
    processor: Any
    template: str
    system_prompt: str | None = None
    image_aspect: str = "pad"
    source: str = ""
    image_token_id: int = field(init=False)
    tokens_per_image: int = field(init=False)

    def __post_init__(self):
        self.image_token_id = self.processor.tokenizer.convert_tokens_to_ids(IMAGE_TAG)
        self.tokens_per_image = tokens_per_image(self.processor)
        self.model.eval()

    def prompt_ids(self, request: Request) -> list[int]:
        """Token ids of the generation prompt, image tags expanded, exactly as training encodes them."""
        system = request.system if request.system is not None else self.system_prompt
        text = generation_prompt(list(request.turns), self.template, self.processor.tokenizer, system)
        tags = text.count(IMAGE_TAG)
        if tags != len(request.images):
            raise DataError(f"the prompt has {tags} {IMAGE_TAG} tag(s) for {len(request.images)} image(s)")
        # Tokenised as `render` marks training text of this template (`image_chunks`), so the prompt is its prefix.
        chunks = self.template in IMAGE_CHUNK_TEMPLATES
        counts = image_token_counts(self.processor, request.images, self.tokens_per_image)
        enc = encode(Rendered(text, (), (), image_chunks=chunks), self.processor.tokenizer, self.image_token_id, counts, NO_LIMIT, "prompt")
        return enc.input_ids

    def generate(self, requests: list[Request], sampling: Sampling = Sampling(), batch_size: int = GENERATION_BATCH) -> list[str]:
        """Answers to `requests`, in order; batches of similar length, left-padded."""
        ids = [self.prompt_ids(r) for r in requests]
        order = sorted(range(len(requests)), key=lambda i: len(ids[i]))
        answers: list[str] = [""] * len(requests)
        if sampling.seed is not None:
            torch.manual_seed(sampling.seed)
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            texts = self.generate_ids([ids[i] for i in chunk], [requests[i].images for i in chunk], sampling)
            for i, text in zip(chunk, texts):
                answers[i] = text
        return answers

    def predict(self, images: list[str | Path | Image.Image], prompt: str, sampling: Sampling = Sampling()) -> str:
        """One answer to `prompt` about `images` (paths or PIL images)."""
        opened = tuple(im if isinstance(im, Image.Image) else open_image(im) for im in images)
        return self.generate([Request((("user", user_text(prompt, len(opened))),), opened)], sampling)[0]

    @torch.inference_mode()
    def generate_ids(
        self, ids: list[list[int]], images: list[tuple[Image.Image, ...]], sampling: Sampling, streamer: Any = None
    ) -> list[str]:
        """Answers to prompts already encoded by `prompt_ids`, as one left-padded batch in the given order.

        `streamer` (a transformers `BaseStreamer`) gets the prompt ids, then each step's new token of every row.
        """
        tok = self.processor.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # masked out either way
        longest = max(len(x) for x in ids)
        device = self.model.device
        input_ids = torch.full((len(ids), longest), pad, dtype=torch.long)
        mask = torch.zeros((len(ids), longest), dtype=torch.long)
        for row, x in enumerate(ids):
            input_ids[row, longest - len(x) :] = torch.tensor(x)
            mask[row, longest - len(x) :] = 1
        inputs = {"input_ids": input_ids.to(device), "attention_mask": mask.to(device)}
        flat = [im for group in images for im in group]
        if flat:
            images = image_inputs(flat, self.processor.image_processor, self.image_aspect)
            inputs.update({k: v.to(device) for k, v in images.items()})
        sample = sampling.temperature > 0
        out = self.model.generate(
            **inputs,
            max_new_tokens=sampling.max_new_tokens,
            do_sample=sample,
            temperature=sampling.temperature if sample else None,
            top_p=sampling.top_p if sample else None,
            top_k=None,
            eos_token_id=tok.convert_tokens_to_ids(stop_token(self.template, tok)) if self.template in TEMPLATES else tok.eos_token_id,
            pad_token_id=pad,
            use_cache=True,  # training switches the cache off in the config
            streamer=streamer,
        )
        texts = [tok.decode(row, skip_special_tokens=True) for row in out[:, longest:]]
        # An untrained model can spell the image placeholder; it is no answer, and kept in a chat's
        # history it would ask for an image that is not there.
        return [t.replace(IMAGE_TAG, "").strip() for t in texts]


def user_text(prompt: str, n_images: int) -> str:
    """The first user turn: LLaVA-1.5 puts the image first, as `<image>\\n` + question, unless tags are placed."""
    tags = prompt.count(IMAGE_TAG)
    if tags == 0:
        return (IMAGE_TAG + "\n") * n_images + prompt
    if tags != n_images:
        raise DataError(f"the prompt has {tags} {IMAGE_TAG} tag(s) for {n_images} image(s)")
    return prompt


def load_predictor(
    source: str | Path,
    adapter: str | Path | None = None,
    template: str = "auto",
    dtype: str | None = None,
    quantization: str | None = None,
) -> Predictor:
    """A model for generation from a model folder / hub id, a run folder, or a base (`source`) plus a run (`adapter`).

    `template` auto: the run's (or a merged folder's recorded) template, else vicuna_v1.
    `dtype` / `quantization` apply to plain models; a run is rebuilt as its recipe says.
    """
    if template != "auto" and template not in TEMPLATES:
        raise LoraLlavaError(f"--template: {template!r} is not one of auto, {', '.join(TEMPLATES)}")
    run = Path(adapter) if adapter else Path(source)
    if adapter or RunPaths(run).has_adapter():
        predictor = _load_run(run, str(source) if adapter else None, dtype, quantization)
    else:
        predictor = _load_plain(str(source), dtype, quantization)
    if template != "auto":
        predictor.template = template
    if predictor.template == "chat_template" and not getattr(predictor.processor.tokenizer, "chat_template", None):
        raise ModelError(f"{source}: template chat_template: this tokenizer has no chat template (use vicuna_v1)")
    return predictor


def _load_run(run_dir: Path, base: str | None, dtype: str | None, quantization: str | None) -> Predictor:
    """Base model rebuilt as the recipe built it (dtype, quantization, stage-1 projector), then the adapter.

    An adapter folder without a recipe.yaml (made elsewhere) goes onto `base`, or the base its adapter_config names.
    """
    from peft import PeftModel

    from ..model.build import load_for_training
    from ..model.load import load_model, load_processor

    paths = RunPaths(run_dir)
    if not paths.has_adapter():
        raise ModelError(f"{run_dir}: no adapter_config.json (not a finished stage-2 run folder)")
    if paths.recipe.is_file():
        recipe = load_recipe(paths.recipe)
        if base:
            recipe = dataclasses.replace(recipe, model=dataclasses.replace(recipe.model, name_or_path=base))
        model, processor = load_for_training(recipe)  # the processor training used
        template, system, aspect = recipe.template, recipe.data.system_prompt, recipe.data.image_aspect
    else:
        base = base or json.loads(paths.adapter_config.read_text(encoding="utf-8")).get("base_model_name_or_path")
        if not base:
            raise ModelError(f"{run_dir}: no recipe.yaml and no base model in adapter_config.json; give the base with --model")
        model = load_model(ModelConfig(name_or_path=base, dtype=dtype or "auto", quantization=quantization or "none"))
        processor = load_processor(base)
        template, system, aspect = checkpoint_template(base), None, "pad"
    model = PeftModel.from_pretrained(model, str(run_dir))
    return Predictor(model, processor, template, system, aspect, source=str(run_dir))


def _load_plain(source: str, dtype: str | None, quantization: str | None) -> Predictor:
    """A llava-hf folder or hub id; a stage-1 run folder gives its saved model; a merged folder its recorded template."""
    from ..model.load import load_model, load_processor

    folder = Path(source)
    recipe = load_recipe(folder / "recipe.yaml") if (folder / "recipe.yaml").is_file() else None
    if recipe is not None and recipe.stage == "align" and RunPaths(folder).model_dir.is_dir():
        source = str(RunPaths(folder).model_dir)  # stage 1 saves the whole model (new projector) beside the run's records
    default_dtype = recipe.model.dtype if recipe is not None else "auto"
    cfg = ModelConfig(name_or_path=source, dtype=dtype or default_dtype, quantization=quantization or "none")
    try:
        model = load_model(cfg)
    except ModelError as e:
        raise ModelError(str(e).replace("model.name_or_path: ", "--model: ")) from None
    return Predictor(
        model=model,
        processor=load_processor(source),
        template=recipe.template if recipe is not None else checkpoint_template(source),  # the checkpoint's own format
        system_prompt=recipe.data.system_prompt if recipe is not None else None,
        image_aspect=recipe.data.image_aspect if recipe is not None else "pad",
        source=source,
    )


def as_predictor(model: str | Path | Predictor, **load_kwargs: Any) -> Predictor:
    return model if isinstance(model, Predictor) else load_predictor(model, **load_kwargs)


def predict(
    model: str | Path | Predictor,
    images: list[str | Path | Image.Image],
    prompt: str,
    max_new_tokens: int = Sampling.max_new_tokens,
    temperature: float = Sampling.temperature,
    top_p: float = Sampling.top_p,
) -> str:
    """The answer of `model` (a folder, hub id or loaded `Predictor`) to `prompt` about `images`."""
    return as_predictor(model).predict(images, prompt, Sampling(max_new_tokens, temperature, top_p))


class ChatSession:
    """A multi-turn conversation about (at most) one image, kept in the predictor's template."""

    def __init__(self, predictor: Predictor, image: str | Path | Image.Image | None = None, sampling: Sampling = Sampling()):
        self.predictor = predictor
        self.sampling = sampling
        self.image: Image.Image | None = None
        self.turns: list[tuple[str, str]] = []
        if image is not None:
            self.load_image(image)

    def load_image(self, image: str | Path | Image.Image) -> None:
        """Talk about this image from now on; a new image starts a new conversation."""
        self.image = image if isinstance(image, Image.Image) else open_image(image)
        self.turns = []

    def reset(self) -> None:
        """Forget the conversation, keep the image."""
        self.turns = []

    def ask(self, text: str) -> str:
        """The answer to `text`, given everything said so far."""
        images = (self.image,) if self.image is not None else ()
        question = user_text(text, len(images)) if not self.turns else text
        answer = self.predictor.generate([Request((*self.turns, ("user", question)), images)], self.sampling)[0]
        self.turns += [("user", question), ("assistant", answer)]
        return answer
