"""`lora-llava predict --model RUN_OR_MODEL --image PATH --prompt TEXT`, or over a file: `--data FILE --output preds.jsonl`."""

from __future__ import annotations

from ..evaluate.sampling import GENERATION_BATCH, Sampling
from ..recipe.describe import choices
from ..recipe.schema import ModelConfig
from .args import positive_int

DEFAULTS = Sampling()


def add_model_args(p) -> None:
    """--model / --adapter / --template / --dtype / --quantization: shared by predict, chat and eval."""
    p.add_argument("--model", metavar="DIR_OR_ID", help="a run folder (base + adapter), a merged or llava-hf folder, or a hub id")
    p.add_argument("--adapter", metavar="RUN", help="a run or adapter folder to put on --model (the base model)")
    p.add_argument(
        "--template",
        default="auto",
        help="prompt template: auto (the run's; vicuna_v1 for plain models, as LLaVA-1.5 evaluates), vicuna_v1, chat_template, plain",
    )
    p.add_argument("--dtype", choices=choices(ModelConfig, "dtype"), help="plain models only; a run uses its recipe's")
    p.add_argument(
        "--quantization", choices=choices(ModelConfig, "quantization"), help="plain models only; a run uses its recipe's"
    )


def add_sampling_args(p, max_new_tokens: int = DEFAULTS.max_new_tokens) -> None:
    p.add_argument(
        "--max-new-tokens", type=positive_int, default=max_new_tokens, help=f"answer length limit (default {max_new_tokens})"
    )
    p.add_argument(
        "--temperature", type=float, default=DEFAULTS.temperature, help="0 (default): greedy decoding, as LLaVA-1.5 evaluates"
    )
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p, help="nucleus sampling threshold (with --temperature > 0)")
    p.add_argument("--seed", type=int, help="seed for sampling")


def sampling(args) -> Sampling:
    return Sampling(args.max_new_tokens, args.temperature, args.top_p, args.seed)


def load(args):
    """The predictor the model arguments describe."""
    from ..errors import LoraLlavaError
    from ..evaluate.generate import load_predictor

    if not args.model:
        raise LoraLlavaError("--model: required (a run folder, a merged or llava-hf model folder, or a hub id)")
    return load_predictor(
        args.model, adapter=args.adapter, template=args.template, dtype=args.dtype, quantization=args.quantization
    )


def register(sub, common) -> None:
    p = sub.add_parser(
        "predict",
        parents=[common],
        help="answer a prompt about images, or every question of a data file",
        description="Answer a prompt about images (the answer is the last line printed), or every question of a "
        "data file into a JSONL of predictions.",
    )
    add_model_args(p)
    p.add_argument("--image", action="append", default=[], metavar="PATH", help="an image (repeat for several)")
    p.add_argument("--prompt", help="the question; the answer is printed as the last line")
    p.add_argument("--data", metavar="FILE", help="batch mode: a LLaVA JSON / JSONL file of questions")
    p.add_argument(
        "--image-folder", metavar="DIR", help="folder the data file's image paths are relative to (default: its folder)"
    )
    p.add_argument(
        "--output", metavar="FILE.jsonl", help="batch mode: one JSON line per question (id, question, answer, reference)"
    )
    p.add_argument("--limit", type=int, help="batch mode: only the first N questions")
    p.add_argument("--batch-size", type=positive_int, default=GENERATION_BATCH, help="prompts generated together (left-padded)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    add_sampling_args(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import LoraLlavaError

    if args.data:
        if not args.output:
            raise LoraLlavaError("--output: required with --data (the JSON-lines file to write)")
        if args.prompt or args.image:
            raise LoraLlavaError("--data: give either --data or --image/--prompt, not both")
        from ..evaluate.run import predict_file

        out = predict_file(
            load(args), args.data, args.output, args.image_folder, sampling(args), args.batch_size, args.limit, args.overwrite
        )
        print(f"wrote {out}")
        return 0
    if not args.prompt:
        raise LoraLlavaError("--prompt: required (or --data FILE --output FILE.jsonl for a whole file)")
    predictor = load(args)
    print(predictor.predict(args.image, args.prompt, sampling(args)), flush=True)
    return 0
