"""Llama-Omni model parts and builders (the model itself and the TTT conversion: issue 3)."""

from components.models.speech import SpeechEncoder, SpeechProjector, whisper_encoder
from components.models.speech_generator import CTCSpeechGenerator

__all__ = ["CTCSpeechGenerator", "SpeechEncoder", "SpeechProjector", "whisper_encoder"]
