"""Llama-Omni model parts and builders (the model itself and the TTT conversion: issue 3)."""

from components.models.speech import SpeechEncoder, SpeechProjector, whisper_encoder

__all__ = ["SpeechEncoder", "SpeechProjector", "whisper_encoder"]
