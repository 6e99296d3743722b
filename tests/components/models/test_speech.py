"""The speech encoder and projector of Llama-Omni, on tiny dimensions and on the meta device."""

import pytest
import torch

from components.models import SpeechEncoder, SpeechProjector, whisper_encoder


def _tiny_encoder():
    return whisper_encoder(num_mel_bins=128, d_model=64, num_layers=2, num_heads=4, ffn_dim=128, max_source_positions=100)


def test_projector_stacks_k_consecutive_frames_in_order():
    torch.manual_seed(0)
    projector = SpeechProjector(encoder_dim=16, llm_dim=24, downsample=5, hidden_dim=32)
    frames = torch.randn(2, 100, 16)
    stacked = torch.stack([torch.cat([frames[:, 5 * j + i] for i in range(5)], dim=-1) for j in range(20)], dim=1)
    expected = projector.linear2(torch.relu(projector.linear1(stacked)))
    torch.testing.assert_close(projector(frames), expected)


def test_projector_drops_the_last_t_mod_k_frames():
    projector = SpeechProjector(encoder_dim=16, llm_dim=24, downsample=5, hidden_dim=32)
    frames = torch.randn(1, 103, 16)
    torch.testing.assert_close(projector(frames), projector(frames[:, :100]))
    assert projector(frames).shape == (1, 20, 24)


def test_projector_refuses_frames_of_the_wrong_width():
    with pytest.raises(ValueError, match="width 8, the projector expects 16"):
        SpeechProjector(16, 24)(torch.randn(1, 10, 8))


def test_speech_encoder_maps_log_mel_to_llm_positions():
    speech = SpeechEncoder(_tiny_encoder(), SpeechProjector(64, 96, downsample=5, hidden_dim=32))
    out = speech(torch.randn(2, 128, 200))
    assert out.shape == (2, 200 // 2 // 5, 96)
    assert not any(p.requires_grad for p in speech.encoder.parameters())
    assert all(p.requires_grad for p in speech.projector.parameters())
    out.sum().backward()
    assert speech.projector.linear1.weight.grad is not None


def test_speech_encoder_requires_the_fixed_frame_count():
    speech = SpeechEncoder(_tiny_encoder(), SpeechProjector(64, 96))
    with pytest.raises(ValueError, match=r"\[B, n_mels, 200\]"):
        speech(torch.randn(2, 128, 150))


def test_llama_omni_speech_side_has_the_published_size():
    """Whisper large-v3's encoder and Llama-Omni's projector (6400 -> 2048 -> 4096), on meta."""
    with torch.device("meta"):
        encoder = whisper_encoder()
        projector = SpeechProjector(encoder_dim=1280, llm_dim=4096, downsample=5, hidden_dim=2048)
    assert sum(p.numel() for p in encoder.parameters()) == 636_968_960
    assert sum(p.numel() for p in projector.parameters()) == 6400 * 2048 + 2048 + 2048 * 4096 + 4096
