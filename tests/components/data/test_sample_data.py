"""The bundled sample set (data/sample, made by scripts/make_sample_data.py) and the synthetic
memory conversations it speaks."""

import json
from pathlib import Path

from components.data.dataset import ConversationDataset
from components.data.synthetic import memory_conversation, write_text_conversations
from components.data.tiny_tokenizer import save_tiny_tokenizer
from components.data.tokenizer import ChatTokenizer

SAMPLE = Path(__file__).resolve().parents[3] / "data" / "sample" / "conversations.json"


def test_sample_set_reads_and_has_conversations_longer_than_several_8k_windows(tmp_path):
    save_tiny_tokenizer(tmp_path)
    dataset = ConversationDataset([SAMPLE], ChatTokenizer.from_dir(tmp_path))  # 300 positions per utterance
    assert len(dataset) == 6 and not dataset.report.skipped
    windows = sorted(-(-n // 8192) for n in dataset.lengths)
    assert windows[0] == 1 and windows[-1] >= 3
    trimmed = ConversationDataset([SAMPLE], ChatTokenizer.from_dir(tmp_path), trim_speech=True)
    assert sum(trimmed.lengths) < sum(dataset.lengths) / 5  # short questions cost tens of positions


def test_sample_set_speaks_the_synthetic_conversations():
    records = json.loads(SAMPLE.read_text())
    for index, record in enumerate(records):
        spoken = [turn["text"] for turn in record["conversation"]]
        expected = [text for _, text in memory_conversation(seed=100 + index, num_facts=3,
                                                            small_talk_turns=(len(spoken) // 2) - 6)]
        assert spoken == expected
        assert all(("speech" in t) == (t["from"] == "human") for t in record["conversation"])


def test_memory_conversations_ask_back_every_fact(tmp_path):
    turns = memory_conversation(seed=3, num_facts=3, small_talk_turns=5)
    assert len(turns) == 2 * (3 + 5 + 3) and [r for r, _ in turns[:2]] == ["user", "assistant"]
    stated = [text for role, text in turns[:6] if role == "user"]
    answers = [text for role, text in turns[-6:] if role == "assistant"]
    for statement, answer in zip(stated, answers):
        assert statement.split()[-1].rstrip(".") in answer
    write_text_conversations(tmp_path / "memory.json", count=4, small_talk_turns=50)
    records = json.loads((tmp_path / "memory.json").read_text())
    assert len(records) == 4 and len(records[0]["conversation"]) == 2 * 56
