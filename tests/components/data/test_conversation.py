"""Reading Llama-Omni's JSON formats; every kind of bad record named, or counted when skipped."""

import json

import numpy as np
import pytest
import soundfile as sf

from components.data.conversation import BadRecord, ReadReport, read_conversations


def _wav(path, seconds=1.0, rate=16000):
    sf.write(str(path), (0.1 * np.sin(np.arange(int(rate * seconds)) / 5)).astype(np.float32), rate)
    return path.name


def _write(tmp_path, records, name="data.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_v1_and_multiturn_records_become_the_same_model(tmp_path):
    audio = _wav(tmp_path / "q.wav")
    v1 = [{"id": "a", "speech": audio, "tgt_units": "5 5 7",
           "conversations": [{"from": "human", "value": "<speech>\nPlease directly answer the questions in the user's speech."},
                             {"from": "gpt", "value": "Paris."}]}]
    multi = [{"id": "b", "conversation": [
        {"from": "human", "speech": audio, "text": "what is the capital of france"},
        {"from": "gpt", "text": "Paris.", "unit": [1, 2, 3]},
        {"from": "human", "text": "And of Italy?"},
        {"from": "gpt", "text": "Rome."}]}]
    (a,) = read_conversations(_write(tmp_path, v1, "v1.json"))
    (b,) = read_conversations(_write(tmp_path, multi, "multi.json"))
    assert [t.role for t in a.turns] == ["user", "assistant"] and a.turns[0].audio == (tmp_path / audio,)
    assert a.turns[1].units == (5, 5, 7) and a.id == "a"
    assert [t.role for t in b.turns] == ["user", "assistant", "user", "assistant"]
    assert b.turns[0].content == "<speech>" and b.turns[0].transcript == "what is the capital of france"
    assert b.turns[1].units == (1, 2, 3) and b.turns[2].audio == ()


@pytest.mark.parametrize("record,message", [
    ({"id": "m", "speech": "nope.wav", "conversations": [{"from": "human", "value": "<speech>"}, {"from": "gpt", "value": "x"}]},
     r"record m of .*: audio file .*nope.wav does not exist"),
    ({"id": "e", "conversation": [{"from": "human", "text": "hi"}, {"from": "gpt", "text": "  "}]},
     r"record e of .*turn 1: the assistant turn is empty"),
    ({"id": "p", "speech": "AUDIO", "conversations": [{"from": "human", "value": "<speech> and <speech>"}, {"from": "gpt", "value": "x"}]},
     r"record p of .*: 2 <speech> placeholders for 1 audio files"),
    ({"id": "u", "conversation": [{"from": "human", "text": "hi"}, {"from": "gpt", "text": "hello"}, {"from": "human", "text": "bye"}]},
     r"record u of .*ends on a user turn"),
    ({"id": "r", "conversation": [{"from": "narrator", "text": "hi"}]}, r"record r of .*unknown speaker 'narrator'"),
    ({"id": "f", "turns": []}, r"record f of .*neither 'conversations'"),
])
def test_bad_records_are_named(tmp_path, record, message):
    audio = _wav(tmp_path / "q.wav")
    record = json.loads(json.dumps(record).replace("AUDIO", audio))
    with pytest.raises(BadRecord, match=message):
        read_conversations(_write(tmp_path, [record]))


def test_malformed_json_names_the_file(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[{"id": "a",')
    with pytest.raises(BadRecord, match="broken.json is not valid JSON"):
        read_conversations(path)


def test_skip_counts_every_bad_record_with_its_reason(tmp_path):
    good = {"id": "g", "conversation": [{"from": "human", "text": "hi"}, {"from": "gpt", "text": "hello"}]}
    bad = {"id": "b", "conversation": [{"from": "human", "text": "hi"}]}
    report = ReadReport()
    conversations = read_conversations(_write(tmp_path, [good, bad, good]), on_bad_record="skip", report=report)
    assert [c.id for c in conversations] == ["g", "g"]
    assert report.read == 2 and len(report.skipped) == 1 and "record b" in report.skipped[0]
    with pytest.raises(ValueError, match="on_bad_record='ignore'"):
        read_conversations(_write(tmp_path, [good]), on_bad_record="ignore")
