"""Metrics as one record: the trainer's named sums, all-reduced in one collective at a log step."""

from __future__ import annotations

import torch

from pipeline.training import metrics
from pipeline.training.metrics import StepSums


def test_step_sums_reduce_every_name_in_one_collective(monkeypatch):
    calls = []
    real = metrics.all_sum

    def counting(values, device):
        calls.append(list(values))
        return real(values, device)

    monkeypatch.setattr(metrics, "all_sum", counting)
    sums = StepSums()
    for step in range(3):
        sums.add("loss", 0.5 * (step + 1))
        sums.add("samples", 4)
        sums.add("gate_abs", torch.tensor([0.1, 0.2]) * (step + 1))  # a tensor stays a tensor until the log step
        sums.steps += 1
    got = sums.reduce(torch.device("cpu"))
    assert len(calls) == 1 and len(calls[0]) == 4  # gate_abs (2 values), loss, samples: one all-reduce
    assert got["loss"] == 3.0 and got["samples"] == 12.0
    torch.testing.assert_close(torch.tensor(got["gate_abs"]), torch.tensor([0.6, 1.2]), rtol=0, atol=1e-6)
    assert sums.steps == 3
    sums.reset()
    assert sums.steps == 0 and sums.reduce(torch.device("cpu")) == {}
