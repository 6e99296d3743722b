"""Audio for Llama-Omni: any WAV/FLAC to 16 kHz mono, 30 s pieces, 128-bin log-mel features.

Features come from transformers' ``WhisperFeatureExtractor(feature_size=128)`` (built here,
nothing downloaded), which reproduces Whisper large-v3's log-mel spectrogram. Utterances
longer than 30 s are split into 30 s pieces, each its own speech segment, instead of being
cut off.
"""

import math
from pathlib import Path
from typing import List, Union

import numpy as np
import soundfile as sf
import torch
from transformers import WhisperFeatureExtractor

from components.models.llama_omni import speech_positions

SAMPLE_RATE = 16_000
PIECE_SECONDS = 30
PIECE_SAMPLES = SAMPLE_RATE * PIECE_SECONDS
POSITIONS_PER_PIECE = 300
MIN_SAMPLE_RATE = 8_000
MAX_CHANNELS = 2


class BadAudio(ValueError):
    """Audio that cannot be used; the message names the file."""


def _info(path: Path):
    try:
        info = sf.info(str(path))
    except Exception as error:  # soundfile raises its own error types
        raise BadAudio(f"audio file {path} cannot be read: {error}") from None
    if info.samplerate < MIN_SAMPLE_RATE:
        raise BadAudio(f"audio file {path} has a sample rate of {info.samplerate} Hz; at least {MIN_SAMPLE_RATE} Hz is needed")
    if not 1 <= info.channels <= MAX_CHANNELS:
        raise BadAudio(f"audio file {path} has {info.channels} channels; mono or stereo is expected")
    if info.frames == 0:
        raise BadAudio(f"audio file {path} is empty")
    return info


def resample(audio: np.ndarray, rate: int, target: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling by the FFT (as scipy.signal.resample does)."""
    if rate == target:
        return audio
    n = max(1, round(len(audio) * target / rate))
    spectrum = torch.fft.rfft(torch.from_numpy(audio).double())
    keep = min(spectrum.shape[0], n // 2 + 1)
    return (torch.fft.irfft(spectrum[:keep], n=n) * (n / len(audio))).float().numpy()


def load_audio(path: Union[str, Path]) -> np.ndarray:
    """16 kHz mono float32 samples of a WAV/FLAC file (stereo is averaged)."""
    path = Path(path)
    _info(path)  # named errors for unreadable, too slow or too many channels
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as error:
        raise BadAudio(f"audio file {path} cannot be read: {error}") from None
    return resample(samples.mean(axis=1), rate)


def audio_positions(path: Union[str, Path], trim: bool = False) -> List[int]:
    """LLM positions of each 30 s piece of a file, from its header alone: 300 each as in
    Llama-Omni, or with ``trim`` just enough for the audio each piece holds."""
    info = _info(Path(path))
    seconds = info.frames / info.samplerate
    pieces = max(1, math.ceil(seconds / PIECE_SECONDS))
    if not trim:
        return [POSITIONS_PER_PIECE] * pieces
    last = seconds - (pieces - 1) * PIECE_SECONDS
    return [POSITIONS_PER_PIECE] * (pieces - 1) + [speech_positions(round(last * SAMPLE_RATE))]


class LogMel:
    """Log-mel features of Whisper large-v3: ``[pieces, 128, 3000]`` per audio file."""

    def __init__(self, num_mel_bins: int = 128):
        self.extractor = WhisperFeatureExtractor(feature_size=num_mel_bins, sampling_rate=SAMPLE_RATE)

    def __call__(self, path: Union[str, Path]) -> torch.Tensor:
        samples = load_audio(path)
        pieces = [samples[i : i + PIECE_SAMPLES] for i in range(0, len(samples), PIECE_SAMPLES)]
        features = self.extractor(pieces, sampling_rate=SAMPLE_RATE, return_tensors="np").input_features
        return torch.from_numpy(np.asarray(features, dtype=np.float32))
