"""Model builders with pinned sizes: the real Llama-Omni and a tiny one for tests and the quickstart."""

from typing import Optional

from components.models._component_builders import llama_omni
from components.models.llama_omni import LlamaOmni


def llama_omni_8b(attention_window: Optional[int] = None, memory_len: int = 0) -> LlamaOmni:
    """Llama-3.1-8B-Omni: Llama-3.1-8B-Instruct, Whisper large-v3 encoder, k=5 projector,
    CTC generator "(2,4096,32,11008)" over 1000 units. Build it under ``torch.device("meta")``
    to get the structure without allocating."""
    return llama_omni(
        vocab_size=128_256, num_layers=32, num_heads=32, num_kv_heads=8, embed_dim=4096, intermediate_dim=14_336,
        max_seq_len=131_072, attention_window=attention_window, memory_len=memory_len,
    )


def llama_omni_tiny(vocab_size: int = 512, attention_window: Optional[int] = None, memory_len: int = 0) -> LlamaOmni:
    """A few layers at width 128 with the real interfaces (128 mel bins, 30 s = 300 positions,
    1000 units), for tests and the quickstart."""
    return llama_omni(
        vocab_size=vocab_size, num_layers=4, num_heads=4, num_kv_heads=2, embed_dim=128, intermediate_dim=256,
        max_seq_len=131_072, attention_window=attention_window, memory_len=memory_len,
        speech_encoder_dim=64, speech_encoder_layers=2, speech_encoder_heads=4, speech_encoder_ffn_dim=128,
        speech_projector_dim=128, ctc_num_layers=2, ctc_dim=64, ctc_num_heads=4, ctc_intermediate_dim=128,
        ctc_max_seq_len=8192,
    )
