"""Conversations, read from Llama-Omni's JSON formats into one typed model.

- v1 (LLaVA style, single turn): ``{"id", "speech": path, "conversations": [{"from": "human",
  "value": "<speech>\\nPlease directly answer ..."}, {"from": "gpt", "value": ...}]}``, with
  optional target units ``"tgt_units"`` for the answer.
- multi-turn: ``{"id", "conversation": [{"from", "speech", "text", "unit"}, ...]}``; a turn
  with speech is heard, not read (its text is kept as the transcript).

A turn's ``content`` marks where each of its audio files goes with ``<speech>``. Bad records
raise an error naming the record and the file, or, with ``on_bad_record="skip"``, are
counted in a :class:`ReadReport`. Nothing is dropped silently.
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Tuple, Union

SPEECH_PLACEHOLDER = "<speech>"
_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str  # text, with SPEECH_PLACEHOLDER where each audio file goes
    audio: Tuple[Path, ...] = ()
    units: Optional[Tuple[int, ...]] = None  # target speech units of an assistant turn
    transcript: Optional[str] = None  # what a spoken turn says (not shown to the model)


@dataclass(frozen=True)
class Conversation:
    id: str
    turns: Tuple[Turn, ...]
    source: Path


class BadRecord(ValueError):
    """A record that cannot become a conversation; the message names the record and file."""


@dataclass
class ReadReport:
    """What reading skipped, and why (``on_bad_record="skip"``)."""

    read: int = 0
    skipped: List[str] = field(default_factory=list)


def _units(value, where: str) -> Optional[Tuple[int, ...]]:
    if value is None:
        return None
    items = value.split() if isinstance(value, str) else value
    try:
        return tuple(int(u) for u in items)
    except (TypeError, ValueError):
        raise BadRecord(f"{where}: units must be integers, got {str(value)[:60]!r}") from None


def _audio_path(value, base: Path, where: str) -> Path:
    path = Path(value)
    path = path if path.is_absolute() else base / path
    if not path.exists():
        raise BadRecord(f"{where}: audio file {path} does not exist")
    return path


def _role(value, where: str) -> str:
    if value not in _ROLES:
        raise BadRecord(f"{where}: unknown speaker {value!r}; expected one of {sorted(_ROLES)}")
    return _ROLES[value]


def _from_v1(record: dict, base: Path, where: str) -> List[Turn]:
    speech = record.get("speech")
    paths = [] if speech is None else [speech] if isinstance(speech, str) else list(speech)
    audio = tuple(_audio_path(p, base, where) for p in paths)
    turns = []
    for i, message in enumerate(record["conversations"]):
        role = _role(message.get("from"), f"{where}, message {i}")
        content = str(message.get("value", ""))
        turn_audio = audio if role == "user" and SPEECH_PLACEHOLDER in content else ()
        turns.append(Turn(role, content, turn_audio))
    if "tgt_units" in record and turns and turns[-1].role == "assistant":
        last = turns[-1]
        turns[-1] = Turn(last.role, last.content, last.audio, _units(record["tgt_units"], where))
    placed = sum(t.content.count(SPEECH_PLACEHOLDER) for t in turns)
    if placed != len(audio):
        raise BadRecord(f"{where}: {placed} {SPEECH_PLACEHOLDER} placeholders for {len(audio)} audio files")
    return turns


def _from_multiturn(record: dict, base: Path, where: str) -> List[Turn]:
    turns = []
    for i, message in enumerate(record["conversation"]):
        here = f"{where}, turn {i}"
        role = _role(message.get("from"), here)
        text = (message.get("text") or "").strip()
        if message.get("speech"):
            audio = (_audio_path(message["speech"], base, here),)
            turns.append(Turn(role, SPEECH_PLACEHOLDER, audio, _units(message.get("unit"), here), text or None))
        else:
            turns.append(Turn(role, text, (), _units(message.get("unit"), here)))
    return turns


def _check(turns: List[Turn], where: str) -> None:
    if not turns:
        raise BadRecord(f"{where}: the conversation has no turns")
    for i, turn in enumerate(turns):
        if not turn.content.strip():
            raise BadRecord(f"{where}, turn {i}: the {turn.role} turn is empty")
        if turn.content.count(SPEECH_PLACEHOLDER) != len(turn.audio):
            raise BadRecord(
                f"{where}, turn {i}: {turn.content.count(SPEECH_PLACEHOLDER)} {SPEECH_PLACEHOLDER} placeholders "
                f"for {len(turn.audio)} audio files"
            )
    if turns[-1].role != "assistant":
        raise BadRecord(f"{where}: the conversation ends on a user turn; nothing to learn from it")


def read_conversations(
    path: Union[str, Path], on_bad_record: str = "raise", report: Optional[ReadReport] = None
) -> List[Conversation]:
    """Reads a JSON file (a list of records, either format); audio paths are relative to it.

    Args:
        on_bad_record: ``"raise"`` (default) or ``"skip"``; skips are counted in ``report``.
    """
    if on_bad_record not in ("raise", "skip"):
        raise ValueError(f"on_bad_record={on_bad_record!r}; expected 'raise' or 'skip'")
    path = Path(path)
    report = report if report is not None else ReadReport()
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise BadRecord(f"{path} is not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise BadRecord(f"{path} must hold a JSON list of records, found {type(records).__name__}")
    conversations = []
    for index, record in enumerate(records):
        record_id = str(record.get("id", f"#{index}")) if isinstance(record, dict) else f"#{index}"
        where = f"record {record_id} of {path}"
        try:
            if not isinstance(record, dict):
                raise BadRecord(f"{where}: a record must be a JSON object")
            if "conversation" in record:
                turns = _from_multiturn(record, path.parent, where)
            elif "conversations" in record:
                turns = _from_v1(record, path.parent, where)
            else:
                raise BadRecord(f"{where}: neither 'conversations' (v1) nor 'conversation' (multi-turn)")
            _check(turns, where)
        except BadRecord as error:
            if on_bad_record == "raise":
                raise
            report.skipped.append(str(error))
            continue
        conversations.append(Conversation(record_id, tuple(turns), path))
        report.read += 1
    return conversations
