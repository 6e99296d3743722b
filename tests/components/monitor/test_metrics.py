"""MetricsLogger: JSON lines on rank 0, appended across runs, and the torchtune logger alongside."""

import json
import math

import pytest
import torch
from torchtune.training.metric_logging import DiskLogger

from components.monitor import MetricsLogger


def _lines(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_jsonl_and_wrapped_logger(tmp_path):
    disk = DiskLogger(log_dir=str(tmp_path / "disk"), filename="log.txt")
    with MetricsLogger(str(tmp_path), logger=disk) as metrics:
        metrics.log(1, {"loss": torch.tensor(2.5), "lr": 1e-4, "tokens": 128})
        metrics.log(2, {"loss": torch.tensor([float("nan")]), "ttt/layer2/eta/mean": 0.01})
    lines = _lines(tmp_path / "metrics.jsonl")
    assert lines[0] == {"step": 1, "loss": 2.5, "lr": 1e-4, "tokens": 128}
    assert lines[1]["step"] == 2 and math.isnan(lines[1]["loss"])
    assert "loss:2.5" in (tmp_path / "disk" / "log.txt").read_text()


def test_resumed_run_appends(tmp_path):
    for step in (1, 2):
        logger = MetricsLogger(str(tmp_path / "out"))
        logger.log(step, {"loss": float(step)})
        assert _lines(tmp_path / "out" / "metrics.jsonl")[-1] == {"step": step, "loss": float(step)}  # flushed
        logger.close()
        logger.close()
    assert [line["step"] for line in _lines(tmp_path / "out" / "metrics.jsonl")] == [1, 2]


def test_other_ranks_write_nothing(tmp_path):
    class Recorder:
        def log_dict(self, payload, step):
            raise AssertionError("rank 1 must not log")

        def close(self):
            pass

    logger = MetricsLogger(str(tmp_path), logger=Recorder(), rank=1)
    logger.log(1, {"loss": 1.0})
    logger.close()
    assert not (tmp_path / "metrics.jsonl").exists()


def test_bad_values_are_refused(tmp_path):
    with MetricsLogger(str(tmp_path)) as logger:
        with pytest.raises(TypeError, match="name"):
            logger.log(1, {"name": "x"})
        with pytest.raises(TypeError, match="vec"):
            logger.log(1, {"vec": torch.ones(3)})
        with pytest.raises(ValueError, match="step"):
            logger.log(1, {"step": 3})
