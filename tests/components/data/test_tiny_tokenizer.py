"""The tiny tokenizer: deterministic, byte-level, Llama-3.1's special tokens, fits the tiny model."""

from transformers import PreTrainedTokenizerFast

from components.data.tiny_tokenizer import SPECIAL_TOKENS, SYSTEM_PROMPT, build_tiny_tokenizer, save_tiny_tokenizer
from components.models import llama_omni_tiny


def test_the_same_tokenizer_every_time():
    assert build_tiny_tokenizer().to_str() == build_tiny_tokenizer().to_str()


def test_any_text_round_trips_and_special_tokens_are_single_ids():
    tokenizer = build_tiny_tokenizer()
    assert tokenizer.get_vocab_size() == 512 == llama_omni_tiny().config["vocab_size"]
    for token in SPECIAL_TOKENS:
        assert len(tokenizer.encode(token).ids) == 1, token
    text = "<|start_header_id|>user<|end_header_id|>\n\nWhere's Zürich? 東京 is far. 42!<|eot_id|>"
    assert tokenizer.decode(tokenizer.encode(text).ids, skip_special_tokens=False) == text
    assert len(tokenizer.encode(SYSTEM_PROMPT).ids) < len(SYSTEM_PROMPT) / 3  # it learned real merges


def test_saved_files_load_in_transformers(tmp_path):
    save_tiny_tokenizer(tmp_path)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(tmp_path))
    assert tokenizer.eos_token == "<|eot_id|>" and tokenizer.bos_token == "<|begin_of_text|>"
    assert tokenizer.decode(tokenizer("hello there")["input_ids"]) == "hello there"
