"""The data benchmark runs end to end (its numbers come from `python -m benchmarks.data`)."""

import json
import subprocess
import sys


def test_data_benchmark_reports_every_rate():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.data", "--json", "--model-steps", "1", "--window", "4096"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(done.stdout)
    for key in ("feature_utterances_per_s", "pipeline_windows_per_s", "tiny_model_train_windows_per_s"):
        assert result[key] > 0, key
    assert result["recordings"] == 68
