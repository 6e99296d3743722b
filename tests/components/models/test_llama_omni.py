"""Llama-Omni as a whole: sizes of the real model, speech splicing, trimming, CTC, state."""

import pytest
import torch

from components.models import SPEECH_TOKEN_ID, llama_omni_8b, llama_omni_tiny, speech_positions

FRAMES = 3000  # 30 s of 10 ms log-mel frames


def _count(module):
    return sum(p.numel() for p in module.parameters())


def test_8b_on_meta_has_the_published_sizes():
    with torch.device("meta"):
        model = llama_omni_8b()
    assert _count(model.decoder) == 8_030_261_248  # Llama-3.1-8B
    assert _count(model.speech.encoder) == 636_968_960  # Whisper large-v3 encoder
    assert _count(model.speech.projector) == 6400 * 2048 + 2048 + 2048 * 4096 + 4096
    # CTC generator "(2,4096,32,11008)": input_proj, two Llama layers, output_proj to 1000 units + blank
    layer = 4 * 4096 * 4096 + 3 * 4096 * 11008 + 2 * 4096
    assert _count(model.speech_generator) == (4096 * 4096 + 4096) + 2 * layer + (4096 * 1001 + 1001)
    assert _count(model) == 9_114_381_289


def _tokens(rows, vocab=512):
    """rows: lists of ints (text ids) and ("speech", n) runs of placeholders."""
    out = []
    for row in rows:
        ids = []
        for part in row:
            ids += [SPEECH_TOKEN_ID] * part[1] if isinstance(part, tuple) else [part]
        out.append(ids)
    return torch.tensor(out)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return llama_omni_tiny().eval()


def test_speech_fills_the_placeholders_in_order(tiny):
    speech = torch.randn(3, 128, FRAMES)
    # row 0 holds utterances 0 and 1, row 1 holds utterance 2; every utterance keeps its 300 positions
    tokens = _tokens([[1, ("speech", 300), 2, ("speech", 300), 3], [4, 5, ("speech", 300)] + [6] * 301])
    with torch.no_grad():
        embedded = tiny.embed(tokens, speech)
        expected = tiny.encode_speech(speech).reshape(-1, 128)
    torch.testing.assert_close(embedded[tokens == SPEECH_TOKEN_ID], expected)
    torch.testing.assert_close(embedded[0, 0], tiny.decoder.tok_embeddings.weight[1])
    out = tiny(tokens, speech)
    assert out.logits.shape == (2, tokens.shape[1], 512) and out.ctc_loss is None


def test_trimmed_utterances_use_their_first_positions(tiny):
    speech = torch.randn(2, 128, FRAMES)
    tokens = _tokens([[1, ("speech", 40), 2, ("speech", 25), 3]])
    lengths = torch.tensor([40, 25])
    with torch.no_grad():
        embedded = tiny.embed(tokens, speech, lengths)
        projected = tiny.encode_speech(speech)
    torch.testing.assert_close(embedded[tokens == SPEECH_TOKEN_ID], torch.cat([projected[0, :40], projected[1, :25]]))


def test_a_window_can_start_inside_an_utterance(tiny):
    speech = torch.randn(2, 128, FRAMES)
    tokens = _tokens([[("speech", 60), 7, ("speech", 25)]])  # the last 60 positions of utterance 0
    with torch.no_grad():
        embedded = tiny.embed(tokens, speech, torch.tensor([60, 25]), torch.tensor([240, 0]))
        projected = tiny.encode_speech(speech)
    torch.testing.assert_close(embedded[tokens == SPEECH_TOKEN_ID], torch.cat([projected[0, 240:], projected[1, :25]]))


def test_placeholder_and_speech_mismatches_are_refused(tiny):
    speech = torch.randn(1, 128, FRAMES)
    with pytest.raises(ValueError, match="hold 10 speech positions but the 1 utterances give 300"):
        tiny.embed(_tokens([[1, ("speech", 10)]]), speech)
    with pytest.raises(ValueError, match="no speech was given"):
        tiny.embed(_tokens([[1, ("speech", 10)]]))
    with pytest.raises(ValueError, match="must pick 1..300 positions"):
        tiny.embed(_tokens([[1, ("speech", 10)]]), speech, torch.tensor([400]))
    with pytest.raises(ValueError, match="must pick 1..300 positions"):
        tiny.embed(_tokens([[1, ("speech", 10)]]), speech, torch.tensor([10]), torch.tensor([295]))
    with pytest.raises(ValueError, match=r"\[B, n_mels, 3000\]"):
        tiny.embed(_tokens([[1, ("speech", 300)]]), torch.randn(1, 128, 1000))


def test_speech_positions_cover_the_audio():
    assert speech_positions(16000) == 10
    assert speech_positions(16000 * 30) == 300
    assert speech_positions(16000 * 45) == 300
    assert speech_positions(100) == 1
    assert speech_positions(16001) == 11


def test_ctc_loss_when_units_are_given(tiny):
    tokens = _tokens([[1, 2, 3, 4, 5, 6]])
    labels = torch.tensor([[-100, -100, -100, 4, 5, 6]])
    units = torch.tensor([[7, 7, 8, 9, 999]])
    out = tiny(tokens, labels=labels, units=units)
    assert out.ctc_loss is not None and torch.isfinite(out.ctc_loss)
    with pytest.raises(ValueError, match="needs labels"):
        tiny(tokens, units=units)


def test_a_conversation_in_chunks_with_windowed_attention_and_memory():
    """Every attention layer windowed, memory >= window: chunks with the state carried give the
    logits of one call, speech included."""
    torch.manual_seed(0)
    model = llama_omni_tiny(attention_window=32, memory_len=32).eval()
    speech = torch.randn(1, 128, FRAMES)
    tokens = _tokens([[1, 2, ("speech", 20), 3, 4, 5, 6, 7, 8, 9, 10] + list(range(11, 61))])
    lengths = torch.tensor([20])
    with torch.no_grad():
        whole = model(tokens, speech, speech_lengths=lengths).logits
        first = model(tokens[:, :30], speech, speech_lengths=lengths)
        second = model(tokens[:, 30:55], state=first.state)
        third = model(tokens[:, 55:], state=second.state)
    chunked = torch.cat([first.logits, second.logits, third.logits], dim=1)
    torch.testing.assert_close(chunked, whole, rtol=1e-5, atol=1e-5)
    assert all(layer[0].k.shape[2] == 32 for layer in second.state.layers)


def test_chunked_token_loss_equals_cross_entropy_of_the_logits_with_its_gradients():
    torch.manual_seed(0)
    model = llama_omni_tiny()
    tokens = torch.randint(0, 512, (2, 50))
    targets = torch.randint(0, 512, (2, 50)).masked_fill(torch.rand(2, 50) < 0.3, -100)
    logits = model(tokens).logits
    expected = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="none").view(2, 50).sum(1)
    expected.sum().backward()
    wanted = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    model.zero_grad()
    out = model(tokens, targets=targets, loss_chunk_size=16)  # 4 chunks, the last partial
    assert out.logits is None and out.token_loss.shape == (2,)
    torch.testing.assert_close(out.token_loss, expected)
    out.token_loss.sum().backward()
    for got, want in zip([p.grad for p in model.parameters() if p.grad is not None], wanted):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_ctc_per_turn_equals_the_generator_on_each_turn_alone():
    """units + unit_turns: each assistant turn's units are generated from its own hidden states;
    the sum equals the generator run on each slice separately."""
    torch.manual_seed(0)
    model = llama_omni_tiny().eval()
    tokens = torch.randint(0, 512, (2, 40))
    turns = torch.tensor([[0, 3, 9], [1, 10, 30], [0, 20, 24]])
    units = torch.tensor([[1, 2, 3, -100], [4, 4, 5, 6], [7, -100, -100, -100]])
    out = model(tokens, units=units, unit_turns=turns, ctc_reduction="sum")
    hidden = out.hidden
    alone = sum(
        model.speech_generator(hidden[r:r + 1, s:e], torch.zeros(1, e - s, dtype=torch.long), u[u != -100].view(1, -1), "sum")
        for (r, s, e), u in zip(turns.tolist(), units)
    )
    torch.testing.assert_close(out.ctc_loss, alone)
    mean = model(tokens, units=units, unit_turns=turns).ctc_loss
    torch.testing.assert_close(mean, alone / 8)


def test_a_trainable_generator_gets_zero_gradients_without_units():
    model = llama_omni_tiny()
    model(torch.randint(0, 512, (1, 20))).logits.sum().backward()
    grads = [p.grad for p in model.speech_generator.parameters()]
    assert all(g is not None and not g.any() for g in grads)  # in the graph, contributing nothing
