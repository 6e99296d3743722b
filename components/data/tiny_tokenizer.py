"""A tiny byte-level BPE tokenizer for tiny runs, in the format of Llama-3.1's tokenizer.json.

Trained here, deterministically, on a small built-in English corpus, with Llama-3.1's special
tokens; byte-level, so any text (any script) encodes. 512 ids, the tiny model's vocabulary.
"""

import json
from pathlib import Path
from typing import Union

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

SPECIAL_TOKENS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "<|eom_id|>",
    "<|python_tag|>",
    "<|finetune_right_pad_id|>",
]
SYSTEM_PROMPT = (
    "You are a helpful language and speech assistant. You are able to understand the speech content that the "
    "user provides, and assist the user with a variety of tasks using natural language."
)
_WORDS = (
    "the of and to in is you that it he was for on are as with his they at be this have from or one had by word "
    "but not what all were we when your can said there use an each which she do how their if will up other about "
    "out many then them these so some her would make like him into time has look two more write go see number no "
    "way could people my than first water been call who oil its now find long down day did get come made may part "
    "what where why please tell me remember name city color favorite question answer earlier said before again "
    "thank hello yes sure today tomorrow morning evening music book travel weather food friend family work home"
).split()


def _corpus():
    for _ in range(20):  # every conversation opens with it
        yield SYSTEM_PROMPT
    for i, word in enumerate(_WORDS):
        neighbours = " ".join(_WORDS[(i * 7 + j) % len(_WORDS)] for j in range(8))
        yield f"{word.capitalize()} {neighbours}, {i}. What is {word}? {word} {i * 13 % 100}!"


def build_tiny_tokenizer(vocab_size: int = 512) -> Tokenizer:
    """The tiny tokenizer; the same every time for the same ``vocab_size``."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return tokenizer


def save_tiny_tokenizer(path: Union[str, Path], vocab_size: int = 512) -> None:
    """Writes ``tokenizer.json`` and ``tokenizer_config.json`` into ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    build_tiny_tokenizer(vocab_size).save(str(path / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<|begin_of_text|>",
        "eos_token": "<|eot_id|>",
        "pad_token": "<|finetune_right_pad_id|>",
        "model_max_length": 2048,
    }
    (path / "tokenizer_config.json").write_text(json.dumps(config, indent=2))


def tiny_chat_tokenizer(vocab_size: int = 512):
    """The tiny tokenizer as a :class:`components.data.tokenizer.ChatTokenizer`, built in memory."""
    from components.data.tokenizer import ChatTokenizer  # the tokenizer module imports this one

    return ChatTokenizer.from_tokenizers(build_tiny_tokenizer(vocab_size))
