"""Llama-Omni: builders, the model and its parts, and the TTT conversion."""

from components.models._component_builders import llama_omni
from components.models._model_builders import llama_omni_8b, llama_omni_tiny
from components.models.convert import TTTGate, convert_to_ttt, converted_settings, ttt_modules, ttt_parameters
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
    "TTTGate",
    "convert_to_ttt",
    "converted_settings",
    "llama_omni",
    "llama_omni_8b",
    "llama_omni_tiny",
    "speech_positions",
    "ttt_modules",
    "ttt_parameters",
    "whisper_encoder",
]
