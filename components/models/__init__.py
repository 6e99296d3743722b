"""Llama-Omni: builders, the model and its parts (the TTT conversion lands with issue 3)."""

from components.models._component_builders import llama_omni
from components.models._model_builders import llama_omni_8b, llama_omni_tiny
from components.models.llama_omni import SPEECH_TOKEN_ID, LlamaOmni, LlamaOmniOutput, OmniState, speech_positions
from components.models.speech import SpeechEncoder, SpeechProjector, whisper_encoder
from components.models.speech_generator import CTCSpeechGenerator

__all__ = [
    "CTCSpeechGenerator",
    "LlamaOmni",
    "LlamaOmniOutput",
    "OmniState",
    "SPEECH_TOKEN_ID",
    "SpeechEncoder",
    "SpeechProjector",
    "llama_omni",
    "llama_omni_8b",
    "llama_omni_tiny",
    "speech_positions",
    "whisper_encoder",
]
