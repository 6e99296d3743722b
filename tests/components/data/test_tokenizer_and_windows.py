"""Chat-format streams: labels on assistant turns only, speech expanded per 30 s piece,
windows that cut speech runs, both vocabulary formats."""

import base64

import numpy as np
import pytest
import soundfile as sf

from components.data.audio import audio_positions
from components.data.conversation import Conversation, Turn
from components.data.tiny_tokenizer import save_tiny_tokenizer
from components.data.tokenizer import IGNORE_INDEX, ChatTokenizer, tokenize_conversation
from components.models import SPEECH_TOKEN_ID


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    save_tiny_tokenizer(path)
    return ChatTokenizer.from_dir(path)


def _conversation(tmp_path, seconds=(2.0, 40.0)):
    paths = []
    for i, s in enumerate(seconds):
        path = tmp_path / f"u{i}.flac"
        sf.write(str(path), np.zeros(int(16000 * s), dtype=np.float32), 16000)
        paths.append(path)
    turns = (
        Turn("user", "<speech>", (paths[0],)),
        Turn("assistant", "It is sunny."),
        Turn("user", "Listen: <speech> What was that?", (paths[1],)),
        Turn("assistant", "A long silence."),
    )
    return Conversation("c1", turns, tmp_path / "data.json")


def test_labels_cover_exactly_the_assistant_answers(tmp_path, tok):
    stream = tokenize_conversation(_conversation(tmp_path), tok, lambda p: audio_positions(p, trim=True))
    assert stream.tokens[0] == tok.special_ids["<|begin_of_text|>"] and len(stream.labels) == len(stream.tokens)
    eot = tok.special_ids["<|eot_id|>"]
    labelled = [t for t, l in zip(stream.tokens, stream.labels) if l != IGNORE_INDEX]
    answers = tok.encode("It is sunny.") + [eot] + tok.encode("A long silence.") + [eot]
    assert labelled == answers
    assert all(l in (IGNORE_INDEX, t) for t, l in zip(stream.tokens, stream.labels))
    assert SPEECH_TOKEN_ID not in labelled


def test_speech_is_expanded_per_30s_piece(tmp_path, tok):
    stream = tokenize_conversation(_conversation(tmp_path), tok, lambda p: audio_positions(p, trim=True))
    assert [(s.piece, s.positions) for s in stream.speech] == [(0, 20), (0, 300), (1, 100)]
    for span in stream.speech:
        assert stream.tokens[span.start : span.start + span.positions] == [SPEECH_TOKEN_ID] * span.positions
    assert stream.tokens.count(SPEECH_TOKEN_ID) == 420
    full = tokenize_conversation(_conversation(tmp_path), tok, audio_positions)  # Llama-Omni: 300 per piece
    assert [s.positions for s in full.speech] == [300, 300, 300]


def test_windows_tile_the_stream_and_cut_speech_runs(tmp_path, tok):
    stream = tokenize_conversation(_conversation(tmp_path), tok, lambda p: audio_positions(p, trim=True))
    size = 128
    windows = [stream.window(i, size) for i in range(-(-len(stream) // size))]
    assert sum((w.tokens for w in windows), []) == stream.tokens
    assert sum((w.labels for w in windows), []) == stream.labels
    assert sum((w.targets for w in windows), []) == stream.labels[1:] + [-100]  # next-token labels across cuts
    for span in stream.speech:
        used = [(first, count) for w in windows for s, first, count in w.speech if s == span]
        assert sum(c for _, c in used) == span.positions and used[0][0] == 0
        assert all(a[0] + a[1] == b[0] for a, b in zip(used, used[1:]))  # contiguous slices
    for w in windows:
        assert w.tokens.count(SPEECH_TOKEN_ID) == sum(c for _, _, c in w.speech)
    with pytest.raises(IndexError, match="no window 99"):
        stream.window(99, size)


def test_tiktoken_vocabulary_from_original_tokenizer_model(tmp_path):
    (tmp_path / "original").mkdir()
    lines = [f"{base64.b64encode(bytes([b])).decode()} {b}" for b in range(256)]
    (tmp_path / "original" / "tokenizer.model").write_text("\n".join(lines) + "\n")
    tok = ChatTokenizer.from_dir(tmp_path)
    assert tok.special_ids["<|begin_of_text|>"] == 128000 and tok.special_ids["<|eot_id|>"] == 128009
    assert tok.encode("hi") == [ord("h"), ord("i")]


def test_a_directory_without_a_vocabulary_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither tokenizer.json nor original/tokenizer.model"):
        ChatTokenizer.from_dir(tmp_path)


def test_unit_targets_follow_their_turn_into_the_window_that_holds_it_whole(tmp_path, tok):
    base = _conversation(tmp_path)
    turns = list(base.turns)
    turns[1] = Turn("assistant", "It is sunny.", units=(5, 6, 7))
    turns[3] = Turn("assistant", "A long silence.", units=(8, 9))
    stream = tokenize_conversation(Conversation("c1", tuple(turns), base.source), tok, lambda p: audio_positions(p, trim=True))
    labelled = [i for i, l in enumerate(stream.labels) if l != IGNORE_INDEX]
    first, second = stream.unit_spans
    assert list(range(first.start, first.end)) + list(range(second.start, second.end)) == labelled
    assert (first.units, second.units) == ((5, 6, 7), (8, 9))
    whole = stream.window(0, len(stream))
    assert [(u.start, u.end) for u in whole.units] == [(first.start, first.end), (second.start, second.end)]
    cut = (first.start + first.end) // 2  # a window boundary inside the first answer
    before, after = (stream.window(i, cut) for i in (0, 1))
    assert before.units == () and [u.units for u in after.units] == ([(8, 9)] if second.end <= 2 * cut else [])
    if after.units:
        assert after.units[0].start == second.start - cut
