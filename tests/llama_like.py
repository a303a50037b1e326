"""A LLaMA-like SentencePiece tokenizer trained here, in legacy and non-legacy flavours.

Vicuna/LLaMA tokenizers are SentencePiece BPE models with byte fallback (a newline
is `<0x0A>`), split digits (a space before a digit is a lone "▁") and a dummy
prefix; the tiny tokenizer of `lora_llava.tiny` has none of these, so token-level
fidelity tests train one of this kind (well under a second) and wrap it in
transformers' `LlamaTokenizer` with `legacy=True` and `legacy=False`, then add
`<image>` and `<pad>` as llava-hf does.
"""

from __future__ import annotations

import functools
import random
import tempfile
from pathlib import Path

import pytest

_WORDS = (
    "what is shown in this image picture describe the colour of shape red green blue yellow circle square how many "
    "lesions are there where organ which side left right lung heart liver kidney brain chest scan normal abnormal yes "
    "no answer question using single word or phrase a chat between curious user and an artificial intelligence "
    "assistant gives helpful detailed polite answers to user's questions USER ASSISTANT: count total price"
).split()
# A few common CJK characters become pieces; rarer ones in answers fall back to bytes, as in LLaMA.
_CJK = "的是肺心脏肝左右图像中有几个病变正常异常器官"


def _corpus(n: int = 3000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    lines = []
    for _ in range(n):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 12))]
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), str(rng.randint(0, 2000)))
        if rng.random() < 0.2:  # Chinese runs inside English lines, never after a space at a line start
            at = rng.randrange(1, len(words) + 1)
            words[at - 1] += "".join(rng.choice(_CJK) for _ in range(rng.randint(2, 6)))
        if rng.random() < 0.5:
            words[0] = words[0].capitalize()
        lines.append(" ".join(words) + rng.choice(["", ".", "?", ","]))
    return lines


@functools.lru_cache(maxsize=1)
def sentencepiece_model() -> Path:
    """The trained model file (one per test process): ids 0/1/2 are `<unk>`/`<s>`/`</s>` as in LLaMA."""
    import sentencepiece as spm

    folder = Path(tempfile.mkdtemp(prefix="llama-like-"))
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus()),
        model_prefix=str(folder / "tokenizer"),
        model_type="bpe",
        vocab_size=600,
        byte_fallback=True,
        split_digits=True,
        add_dummy_prefix=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=0.9995,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def llama_like_tokenizer(legacy: bool, llava_tokens: bool = True):
    """The trained model as a transformers LlamaTokenizer; with `<image>` and `<pad>` appended as llava-hf does."""
    from transformers import LlamaTokenizer

    # from_pretrained converts the SentencePiece model (pieces, merges, byte fallback) to the fast backend.
    tok = LlamaTokenizer.from_pretrained(str(sentencepiece_model().parent), legacy=legacy, add_bos_token=True)
    if llava_tokens:
        tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
        tok.add_special_tokens({"pad_token": "<pad>"})
    return tok


@pytest.fixture(scope="session", params=[False, True], ids=["non-legacy", "legacy"])
def llama_like(request):
    """A LLaMA-like tokenizer with `<image>` and `<pad>`, in each flavour."""
    return llama_like_tokenizer(legacy=request.param)
