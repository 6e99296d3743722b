"""The speech side of Llama-Omni: the Whisper encoder and the concat projector.

The encoder is transformers' ``WhisperEncoder`` built from a config (nothing is downloaded);
the projector is Llama-Omni's ``EncoderProjectorConcat`` (``speech_projector_type: linear``):
drop ``T mod k`` frames, stack k consecutive frames, Linear -> ReLU -> Linear.
"""

from torch import Tensor, nn
from transformers import WhisperConfig
from transformers.models.whisper.modeling_whisper import WhisperEncoder


def whisper_encoder(
    num_mel_bins: int = 128,
    d_model: int = 1280,
    num_layers: int = 32,
    num_heads: int = 20,
    ffn_dim: int = 5120,
    max_source_positions: int = 1500,
) -> WhisperEncoder:
    """A Whisper encoder from its dimensions (defaults: Whisper large-v3, Llama-Omni's encoder).

    It takes exactly ``2 * max_source_positions`` mel frames (30 s for large-v3) and returns
    ``max_source_positions`` frames of width ``d_model``.
    """
    config = WhisperConfig(
        num_mel_bins=num_mel_bins,
        d_model=d_model,
        encoder_layers=num_layers,
        encoder_attention_heads=num_heads,
        encoder_ffn_dim=ffn_dim,
        max_source_positions=max_source_positions,
    )
    return WhisperEncoder(config)


class SpeechProjector(nn.Module):
    """Llama-Omni's concat projector: ``[B, T, encoder_dim] -> [B, T // k, llm_dim]``.

    Args:
        encoder_dim: width of the encoder's frames (``speech_encoder_hidden_size``).
        llm_dim: width of the language model.
        downsample: k, frames stacked into one position (``speech_encoder_ds_rate``).
        hidden_dim: width between the two linears (2048 in Llama-Omni).
    """

    def __init__(self, encoder_dim: int, llm_dim: int, downsample: int = 5, hidden_dim: int = 2048):
        super().__init__()
        if downsample < 1:
            raise ValueError(f"downsample (speech_encoder_ds_rate) must be >= 1, got {downsample}")
        self.encoder_dim, self.llm_dim, self.k = encoder_dim, llm_dim, downsample
        self.linear1 = nn.Linear(encoder_dim * downsample, hidden_dim)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden_dim, llm_dim)

    def forward(self, frames: Tensor) -> Tensor:
        B, T, D = frames.shape
        if D != self.encoder_dim:
            raise ValueError(f"speech frames have width {D}, the projector expects {self.encoder_dim}")
        T = T - T % self.k  # the last T mod k frames are dropped, as in Llama-Omni
        stacked = frames[:, :T].reshape(B, T // self.k, D * self.k)  # [B,T,D] -> [B,T/k,kD]
        return self.linear2(self.relu(self.linear1(stacked)))


class SpeechEncoder(nn.Module):
    """Encoder then projector: log-mel ``[B, n_mels, frames]`` -> ``[B, frames / 2 / k, llm_dim]``.

    Args:
        encoder: a Whisper encoder (see :func:`whisper_encoder`).
        projector: the concat projector.
        freeze_encoder: keep the encoder's parameters out of training (Llama-Omni does).
    """

    def __init__(self, encoder: WhisperEncoder, projector: SpeechProjector, freeze_encoder: bool = True):
        super().__init__()
        self.encoder, self.projector = encoder, projector
        if freeze_encoder:
            self.encoder.requires_grad_(False)

    @property
    def frames_per_utterance(self) -> int:
        """Mel frames the encoder takes: ``2 * max_source_positions``."""
        return 2 * self.encoder.config.max_source_positions

    def forward(self, features: Tensor) -> Tensor:
        expected = self.frames_per_utterance
        if features.dim() != 3 or features.shape[-1] != expected:
            raise ValueError(
                f"speech features must be [B, n_mels, {expected}] log-mel frames (the encoder takes exactly "
                f"2 * max_source_positions); got {tuple(features.shape)}"
            )
        dtype = next(self.encoder.parameters()).dtype
        frames = self.encoder(features.to(dtype)).last_hidden_state  # [B, frames/2, encoder_dim]
        return self.projector(frames.to(self.projector.linear1.weight.dtype))
