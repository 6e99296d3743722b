"""The component builder: every knob of Llama-Omni (sizes are pinned in _model_builders.py)."""

from typing import Optional

from components.models.decoder import llama3_1_decoder
from components.models.llama_omni import LlamaOmni
from components.models.speech import SpeechEncoder, SpeechProjector, whisper_encoder
from components.models.speech_generator import CTCSpeechGenerator


def llama_omni(
    *,
    vocab_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    embed_dim: int,
    intermediate_dim: int,
    max_seq_len: int,
    rope_base: float = 500_000.0,
    rope_scale_factor: int = 8,
    norm_eps: float = 1e-5,
    attention_window: Optional[int] = None,
    memory_len: int = 0,
    num_mel_bins: int = 128,
    speech_encoder_dim: int = 1280,
    speech_encoder_layers: int = 32,
    speech_encoder_heads: int = 20,
    speech_encoder_ffn_dim: int = 5120,
    max_source_positions: int = 1500,
    speech_encoder_ds_rate: int = 5,
    speech_projector_dim: int = 2048,
    freeze_speech_encoder: bool = True,
    ctc_num_layers: int = 2,
    ctc_dim: int = 4096,
    ctc_num_heads: int = 32,
    ctc_intermediate_dim: int = 11008,
    unit_vocab_size: int = 1000,
    ctc_upsample_factor: int = 25,
    ctc_max_seq_len: int = 65536,
) -> LlamaOmni:
    """Builds Llama-Omni from its parts.

    Args:
        vocab_size ... norm_eps: the Llama-3.1 decoder (torchtune's ``llama3_1`` arguments).
        attention_window: tokens each attention layer sees, itself included (None: all).
        memory_len: keys/values each attention layer carries to the next call (0: none).
        num_mel_bins ... max_source_positions: the Whisper encoder.
        speech_encoder_ds_rate, speech_projector_dim: the concat projector (k, hidden width).
        freeze_speech_encoder: keep the encoder out of training (Llama-Omni does).
        ctc_*: the CTC speech generator (``ctc_decoder_config``, ``ctc_upsample_factor``).
        unit_vocab_size: speech units of the generator (the blank comes on top).
    """
    config = {k: v for k, v in locals().items()}
    encoder = whisper_encoder(
        num_mel_bins=num_mel_bins, d_model=speech_encoder_dim, num_layers=speech_encoder_layers,
        num_heads=speech_encoder_heads, ffn_dim=speech_encoder_ffn_dim, max_source_positions=max_source_positions,
    )
    projector = SpeechProjector(speech_encoder_dim, embed_dim, downsample=speech_encoder_ds_rate, hidden_dim=speech_projector_dim)
    decoder = llama3_1_decoder(
        vocab_size=vocab_size, num_layers=num_layers, num_heads=num_heads, num_kv_heads=num_kv_heads,
        embed_dim=embed_dim, intermediate_dim=intermediate_dim, max_seq_len=max_seq_len, rope_base=rope_base,
        rope_scale_factor=rope_scale_factor, norm_eps=norm_eps, attention_window=attention_window, memory_len=memory_len,
    )
    generator = CTCSpeechGenerator(
        embed_dim, num_layers=ctc_num_layers, dim=ctc_dim, num_heads=ctc_num_heads, intermediate_dim=ctc_intermediate_dim,
        unit_vocab_size=unit_vocab_size, upsample_factor=ctc_upsample_factor, rope_base=rope_base,
        rope_scale_factor=rope_scale_factor, max_seq_len=ctc_max_seq_len, norm_eps=norm_eps,
    )
    return LlamaOmni(SpeechEncoder(encoder, projector, freeze_encoder=freeze_speech_encoder), decoder, generator, config)
