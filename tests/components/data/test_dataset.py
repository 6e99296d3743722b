"""Dataset + sampler + collator end to end, into the tiny model."""

import json

import numpy as np
import pytest
import soundfile as sf
import torch

from components.data.conversation import BadRecord
from components.data.dataset import ConversationDataset, collate
from components.data.sampler import StatefulConversationSampler
from components.data.tiny_tokenizer import save_tiny_tokenizer
from components.data.tokenizer import ChatTokenizer
from components.models import SPEECH_TOKEN_ID, llama_omni_tiny


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for i, seconds in enumerate([1.5, 3.0, 35.0]):
        sf.write(str(root / f"u{i}.flac"), (0.05 * rng.standard_normal(int(16000 * seconds))).astype(np.float32), 16000)
    records = [
        {"id": "short", "conversation": [{"from": "human", "speech": "u0.flac", "text": "hi"}, {"from": "gpt", "text": "Hello!"}]},
        {"id": "long", "conversation": sum(([{"from": "human", "speech": f"u{i % 3}.flac"}, {"from": "gpt", "text": f"Answer {i}."}]
                                            for i in range(6)), [])},
        {"id": "text", "conversation": [{"from": "human", "text": "What is 2+2?"}, {"from": "gpt", "text": "4."}]},
    ]
    (root / "train.json").write_text(json.dumps(records))
    save_tiny_tokenizer(root / "tok")
    return root


def test_a_step_collates_into_a_batch_the_model_takes(data):
    tok = ChatTokenizer.from_dir(data / "tok")
    dataset = ConversationDataset([data / "train.json"], tok, trim_speech=True)
    window = 256
    sampler = StatefulConversationSampler(dataset.lengths, window, batch_slots=2, shuffle=False)
    torch.manual_seed(0)
    model = llama_omni_tiny().eval()
    seen_windows = 0
    for step in sampler:
        batch = collate(step, dataset, window)
        assert batch.tokens.shape[1] % 64 == 0 and batch.tokens.shape == batch.mask.shape
        assert torch.equal(batch.labels[~batch.mask], torch.full_like(batch.labels[~batch.mask], -100))
        placeholders = int((batch.tokens == SPEECH_TOKEN_ID).sum())
        assert placeholders == (0 if batch.speech is None else int(batch.speech_lengths.sum()))
        with torch.no_grad():
            out = model(batch.tokens, batch.speech, mask=batch.mask, speech_lengths=batch.speech_lengths,
                        speech_starts=batch.speech_starts)
        assert out.logits.shape[:2] == batch.tokens.shape
        seen_windows += int(batch.active.sum())
        assert batch.reset.tolist() == [bool(i and i.window == 0) for i in step]
    assert seen_windows == sum(-(-n // window) for n in dataset.lengths)


def test_bad_audio_is_named_or_counted(data, tmp_path):
    (tmp_path / "bad.wav").write_bytes(b"not audio")
    records = [{"id": "ok", "conversation": [{"from": "human", "text": "hi"}, {"from": "gpt", "text": "yo"}]},
               {"id": "broken", "conversation": [{"from": "human", "speech": "bad.wav"}, {"from": "gpt", "text": "?"}]}]
    (tmp_path / "d.json").write_text(json.dumps(records))
    tok = ChatTokenizer.from_dir(data / "tok")
    with pytest.raises(BadRecord, match=r"record broken of .*d.json: audio file .*bad.wav cannot be read"):
        ConversationDataset([tmp_path / "d.json"], tok)
    dataset = ConversationDataset([tmp_path / "d.json"], tok, on_bad_record="skip")
    assert len(dataset) == 1 and dataset.report.read == 1 and "record broken" in dataset.report.skipped[0]
