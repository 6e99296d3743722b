"""Throughput of the data pipeline against the tiny model's training step, on one core.

    python -m benchmarks.data [--json] [--window 2048] [--slots 2]

Measures, in one run and one thread: log-mel feature extraction (utterances/s, over the
bundled sample set's recordings), the whole pipeline (sampler -> windows -> features ->
collated batches; windows/s, features computed afresh), and one forward+backward step of
``llama_omni_tiny`` on such a batch (windows/s). The pipeline keeps up when its rate is
at least the model's.
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from components.data.audio import LogMel
from components.data.dataset import ConversationDataset, collate
from components.data.sampler import StatefulConversationSampler
from components.data.tiny_tokenizer import save_tiny_tokenizer
from components.data.tokenizer import ChatTokenizer
from components.models import llama_omni_tiny

SAMPLE = Path(__file__).resolve().parents[1] / "data" / "sample" / "conversations.json"


def _rate(count: int, seconds: float) -> float:
    return count / seconds if seconds > 0 else float("inf")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--window", type=int, default=2048)
    parser.add_argument("--slots", type=int, default=2)
    parser.add_argument("--model-steps", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)

    recordings = sorted((SAMPLE.parent / "audio").glob("*.flac"))
    log_mel = LogMel()
    start = time.perf_counter()
    for path in recordings:
        log_mel(path)
    features_rate = _rate(len(recordings), time.perf_counter() - start)

    with tempfile.TemporaryDirectory() as tmp:
        save_tiny_tokenizer(tmp)
        dataset = ConversationDataset([SAMPLE], ChatTokenizer.from_dir(tmp), trim_speech=True)
    sampler = StatefulConversationSampler(dataset.lengths, args.window, args.slots, seed=0)
    batches, windows = [], 0
    start = time.perf_counter()
    for step in sampler:
        batch = collate(step, dataset, args.window)
        batches.append(batch)
        windows += int(batch.active.sum())
    pipeline_rate = _rate(windows, time.perf_counter() - start)

    torch.manual_seed(0)
    model = llama_omni_tiny()
    full = [b for b in batches if bool(b.active.all())][: args.model_steps] or batches[: args.model_steps]
    model_windows, start = 0, time.perf_counter()
    for batch in full:
        out = model(batch.tokens, batch.speech, mask=batch.mask, speech_lengths=batch.speech_lengths,
                    speech_starts=batch.speech_starts)
        out.logits.float().logsumexp(-1).mean().backward()
        model_windows += int(batch.active.sum())
    model_rate = _rate(model_windows, time.perf_counter() - start)

    result = dict(
        threads=1, window=args.window, slots=args.slots, recordings=len(recordings),
        feature_utterances_per_s=features_rate, pipeline_windows_per_s=pipeline_rate,
        tiny_model_train_windows_per_s=model_rate, pipeline_over_model=pipeline_rate / model_rate,
    )
    if args.json:
        print(json.dumps(result, indent=2))
        return
    for key, value in result.items():
        print(f"{key}: {value:.2f}" if isinstance(value, float) else f"{key}: {value}")


if __name__ == "__main__":
    main()
