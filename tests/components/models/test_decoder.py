"""Our layer loop and attention against torchtune's own decoder, and the windowed attention
with a carried KV memory against one call."""

import pytest
import torch
from torchtune.models.llama3_1 import llama3_1

from components.models.decoder import from_torchtune

VOCAB, LAYERS, HEADS, KV_HEADS, DIM, INTER = 128, 2, 4, 2, 64, 96


def _base(seed=0):
    torch.manual_seed(seed)
    base = llama3_1(vocab_size=VOCAB, num_layers=LAYERS, num_heads=HEADS, num_kv_heads=KV_HEADS, embed_dim=DIM,
                    max_seq_len=512, intermediate_dim=INTER)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return base


def _logits(decoder, tokens, states=None):
    hidden, states = decoder(decoder.tok_embeddings(tokens), states)
    return decoder.output(hidden), states


def test_matches_torchtune_decoder_without_window_or_memory():
    base = _base()
    tokens = torch.randint(0, VOCAB, (2, 37))
    expected = base(tokens)
    logits, _ = _logits(from_torchtune(base), tokens)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("window,memory,sizes", [(16, 16, [5, 11, 1, 20, 3]), (8, 12, [8, 8, 8, 16]), (None, 64, [30, 10, 4])])
def test_chunks_with_memory_give_the_logits_of_one_call(window, memory, sizes):
    """Windowed attention, memory >= window (or everything kept): chunked == one call."""
    decoder = from_torchtune(_base(), attention_window=window, memory_len=memory)
    tokens = torch.randint(0, VOCAB, (2, sum(sizes)))
    whole, _ = _logits(decoder, tokens)
    states, outs, start = None, [], 0
    for size in sizes:
        out, states = _logits(decoder, tokens[:, start : start + size], states)
        outs.append(out)
        start += size
    torch.testing.assert_close(torch.cat(outs, dim=1), whole, rtol=1e-5, atol=1e-5)


def test_a_window_limits_what_a_token_sees():
    decoder = from_torchtune(_base(), attention_window=4)
    tokens = torch.randint(0, VOCAB, (1, 12))
    changed = tokens.clone()
    changed[0, 0] = (tokens[0, 0] + 1) % VOCAB
    a, _ = _logits(decoder, tokens)
    b, _ = _logits(decoder, changed)
    # with 2 layers of window 4, token 0 reaches positions up to 6 and no further
    assert not torch.allclose(a[0, 6], b[0, 6])
    torch.testing.assert_close(a[0, 7:], b[0, 7:])
