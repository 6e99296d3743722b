"""The benchmark runs end to end on short inputs (no timing is asserted: numbers come from
`python -m benchmarks.ttt_layer`, not from tests)."""

import json
import subprocess
import sys

import pytest

from benchmarks import ttt_layer


@pytest.mark.parametrize("kind", ["TTTLinear", "TTTMLP", "attention"])
def test_worker_reports_every_field(kind):
    row = ttt_layer.worker(kind, T=128, group=2, repeats=1, reference_path=None)
    assert row["layer"] == kind and row["T"] == 128
    for key in ("fwd_tokens_per_s", "fwd_bwd_tokens_per_s", "fwd_gflops", "fwd_bwd_gflops"):
        assert row[key] > 0, key
    assert row["peak_fwd_bwd_bytes"] >= 0


def test_command_line_json_summary():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.ttt_layer", "--json", "--lengths", "256", "--repeats", "1"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(done.stdout)
    assert {r["layer"] for r in result["rows"]} == {"TTTLinear", "TTTMLP"}
    assert result["summary"]["matmul_gflops"] > 0
