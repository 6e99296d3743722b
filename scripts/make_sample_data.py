"""Synthesizes the bundled multi-turn speech conversation set with espeak-ng.

    apt-get install espeak-ng      # Debian package; only this script needs it
    python scripts/make_sample_data.py data/sample

User turns are spoken (several voices and speeds, 16 kHz mono FLAC), assistant turns are
text; the conversations are the memory conversations of components/data/synthetic.py (facts
early, questions late). Some are long enough to span several 8k-token windows when every
utterance keeps its full 300 positions. Writes ``OUT/conversations.json`` (multi-turn format)
and ``OUT/audio/*.flac``; the output is committed, so nothing else needs espeak-ng.
"""

import argparse
import hashlib
import json
import subprocess
import tempfile
from pathlib import Path

import soundfile as sf

from components.data.audio import SAMPLE_RATE, resample
from components.data.synthetic import memory_conversation

VOICES = ["en-us", "en-gb", "en-gb-scotland", "en-us+f3", "en-gb+f2"]
SPEEDS = [140, 165, 190]
# (small-talk exchanges) per conversation: short ones, and long ones for several 8k windows
SIZES = [2, 3, 4, 6, 30, 80]


def speak(text: str, voice: str, speed: int, target: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        wav = Path(tmp) / "out.wav"
        subprocess.run(["espeak-ng", "-v", voice, "-s", str(speed), "-w", str(wav), text], check=True)
        samples, rate = sf.read(str(wav), dtype="float32")
    sf.write(str(target), resample(samples, rate, SAMPLE_RATE), SAMPLE_RATE, format="FLAC")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args()
    audio_dir = args.output_dir / "audio"
    audio_dir.mkdir(parents=True, exist_ok=True)
    records = []
    for index, small_talk in enumerate(SIZES):
        voice, speed = VOICES[index % len(VOICES)], SPEEDS[index % len(SPEEDS)]
        turns = []
        for role, text in memory_conversation(seed=100 + index, num_facts=3, small_talk_turns=small_talk):
            if role == "assistant":
                turns.append({"from": "gpt", "text": text})
                continue
            # one file per (text, voice, speed): repeated small talk reuses its recording
            name = hashlib.sha1(f"{text}|{voice}|{speed}".encode()).hexdigest()[:12] + ".flac"
            if not (audio_dir / name).exists():
                speak(text, voice, speed, audio_dir / name)
            turns.append({"from": "human", "speech": f"audio/{name}", "text": text})
        records.append({"id": f"sample-{index}", "voice": voice, "speed": speed, "conversation": turns})
    (args.output_dir / "conversations.json").write_text(json.dumps(records, indent=1))
    files = sorted(audio_dir.glob("*.flac"))
    size = sum(f.stat().st_size for f in files)
    seconds = sum(sf.info(str(f)).duration for f in files)
    print(f"{len(records)} conversations, {len(files)} recordings, {seconds:.0f} s of audio, {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
