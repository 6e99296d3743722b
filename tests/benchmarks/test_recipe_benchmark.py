"""The recipe benchmark runs end to end (its numbers come from `python -m benchmarks.recipe`)."""

import json
import subprocess
import sys


def test_recipe_benchmark_reports_every_number():
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.recipe", "--json", "--windows", "512", "1024", "--repeats", "1"],
        capture_output=True, text=True, check=True,
    )
    result = json.loads(done.stdout)
    assert result["step"]["tokens_per_s"] > 0
    for key in ("monitor_share_per_logged_step", "state_share"):  # timed where the work happens
        assert 0 < result["step"][key] < 1, key
    assert [row["window"] for row in result["memory"]] == [512, 1024]
    assert result["memory"][1]["peak_above_start_mib"] > 0 and "growth_vs_previous" in result["memory"][1]
