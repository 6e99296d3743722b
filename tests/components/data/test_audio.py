"""Audio: resampling, downmixing, 30 s pieces, Whisper log-mel features, bad files named."""

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from components.data.audio import BadAudio, LogMel, audio_positions, load_audio, resample


def _tone(path, seconds, rate, channels=1, hz=440.0):
    t = np.arange(int(rate * seconds)) / rate
    wave = (0.3 * np.sin(2 * np.pi * hz * t)).astype(np.float32)
    sf.write(str(path), np.stack([wave] * channels, axis=1) if channels > 1 else wave, rate)
    return path


def test_any_rate_and_stereo_become_16khz_mono(tmp_path):
    samples = load_audio(_tone(tmp_path / "a.flac", 3.0, 22050, channels=2))
    assert samples.dtype == np.float32 and samples.shape == (48000,)
    spectrum = np.abs(np.fft.rfft(samples[:16000]))
    assert np.argmax(spectrum) == 440  # 1 Hz bins: the tone survived resampling
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    np.testing.assert_array_equal(resample(x, 16000), x)


def test_long_audio_is_split_into_30s_pieces(tmp_path):
    path = _tone(tmp_path / "long.wav", 65.0, 16000)
    assert audio_positions(path) == [300, 300, 300]
    assert audio_positions(path, trim=True) == [300, 300, 50]
    features = LogMel()(path)
    assert features.shape == (3, 128, 3000)
    reference = WhisperFeatureExtractor(feature_size=128)(
        [load_audio(path)[:480000]], sampling_rate=16000, return_tensors="np").input_features
    torch.testing.assert_close(features[0], torch.from_numpy(reference[0]))


def test_bad_audio_is_named(tmp_path):
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"RIFF not really a wave file")
    with pytest.raises(BadAudio, match="garbage.wav cannot be read"):
        audio_positions(garbage)
    with pytest.raises(BadAudio, match="low.wav has a sample rate of 4000 Hz"):
        audio_positions(_tone(tmp_path / "low.wav", 1.0, 4000))
    with pytest.raises(BadAudio, match="surround.wav has 3 channels"):
        load_audio(_tone(tmp_path / "surround.wav", 1.0, 16000, channels=3))
