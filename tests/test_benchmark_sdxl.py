"""benchmarks/benchmark_sdxl.py at reduced size (the tiny preset on the CPU): the script the GPU matrix runs."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))


@pytest.mark.slow
def test_benchmark_runs_the_trainer_and_reports_every_figure(tmp_path):
    import benchmark_sdxl

    out = tmp_path / "figures"
    benchmark_sdxl.main(
        [
            "--model",
            "tiny",
            "--resolutions",
            "64",
            "--batch_sizes",
            "1",
            "--steps",
            "1",
            "--warmup_steps",
            "1",
            "--out",
            str(out),
            "--peak_tflops",
            "1",
        ]
    )
    (row,) = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert (row["resolution"], row["batch"], row["variant"]) == (64, 1, "recommended")
    for phase in ("before_pivot", "after_pivot"):
        assert row[phase]["s_per_step"] > 0 and row[phase]["flops"] > 0 and 0 < row[phase]["mfu"] < 1
    # Before the pivot the text encoders are trained too: more FLOPs than after it.
    assert row["before_pivot"]["flops"] > row["after_pivot"]["flops"]
    assert row["first_step_s"] > 0 and row["peak_tensors_gib"] > 0 and row["peak_rss_gib"] > row["peak_tensors_gib"]
    # The planner's estimate of the same command against the tensors the real run held (see benchmarks/README.md).
    # Steady steps (not the pivot step, which also encodes every caption once): within the 15%.
    assert abs(row["plan_error_steady"]) < 0.15
    assert abs(row["plan_error"]) < 0.5
    assert len(row["step_peaks_gib"]) == 2 * (1 + 1 + 1)
    assert "| 64 | 1 | recommended |" in (out / "results.md").read_text()
