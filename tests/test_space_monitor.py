"""The trainer's hooks for the Space: metrics.jsonl per step, and the stop / save / sample control files."""

from __future__ import annotations

import pytest
from safetensors.torch import load_file

from sdxl_pivotal import monitor as monitor_module
from sdxl_pivotal.monitor import TrainingMonitor, read_metrics, request


def request_at(monkeypatch, output_dir, asks: dict[int, list[str]]) -> None:
    """Create control files as another program would, right after the trainer records the given steps."""
    original = TrainingMonitor.step_done

    def step_done(self, step, *args, **kwargs):
        values = original(self, step, *args, **kwargs)
        for name in asks.get(step, []):
            request(output_dir, name)
        return values

    monkeypatch.setattr(TrainingMonitor, "step_done", step_done)


def test_metrics_file_has_one_record_per_step(run_training, tmp_path):
    out = run_training(tmp_path / "run", "--max_train_steps", "4", "--checkpointing_steps", "100")
    records = read_metrics(out)
    steps = [r for r in records if "event" not in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["loss"] > 0 and r["s_per_step"] > 0
        assert r["images_per_s"] == pytest.approx(2 / r["s_per_step"])  # batch 2, 1 process
    assert [(r["event"], r["step"]) for r in records if "event" in r] == [("start", 0), ("finished", 4)]
    assert records[0]["total_steps"] == 4


def test_stop_saves_a_checkpoint_and_resume_matches_an_uninterrupted_run(run_training, tmp_path, monkeypatch):
    flags = ("--max_train_steps", "6", "--checkpointing_steps", "100")
    reference = run_training(tmp_path / "reference", *flags)

    out = tmp_path / "stopped"
    request_at(monkeypatch, out, {3: ["stop"]})
    run_training(out, *flags)
    assert (out / "checkpoint-3").is_dir()
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # a stopped run is not a result
    assert read_metrics(out)[-1]["event"] == "stopped"
    assert not (out / monitor_module.CONTROL_DIR / "stop").exists()  # consumed

    monkeypatch.undo()
    run_training(out, *flags, "--resume_from_checkpoint", "latest")
    records = read_metrics(out)
    assert [r["step"] for r in records if "event" not in r] == [1, 2, 3, 4, 5, 6]
    expected = load_file(reference / "pytorch_lora_weights.safetensors")
    resumed = load_file(out / "pytorch_lora_weights.safetensors")
    assert expected.keys() == resumed.keys()
    for key in expected:
        assert (expected[key] == resumed[key]).all(), key


def test_save_now_and_sample_now(run_training, tmp_path, monkeypatch):
    out = tmp_path / "run"
    request_at(monkeypatch, out, {2: ["save", "sample"]})
    run_training(
        out,
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "100",
        "--validation_prompt",
        "a photo of TOK toy",
        "--validation_steps",
        "100",
        "--num_validation_images",
        "1",
        "--validation_inference_steps",
        "2",
    )
    assert [p.name for p in out.glob("checkpoint-*")] == ["checkpoint-2"]
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["final", "step-2"]


def test_a_resumed_run_drops_records_of_steps_it_redoes(tmp_path):
    monitor = TrainingMonitor(tmp_path, images_per_step=1)
    monitor.start(0, 5)
    for step in (1, 2, 3):
        monitor.step_started()
        monitor.step_done(step, 1.0, 1e-4, epoch=0)
    request(tmp_path, "save")  # stale: from before the crash
    monitor.start(2, 5)  # resumed from checkpoint-2
    assert [r.get("step") for r in read_metrics(tmp_path)] == [0, 1, 2, 2]
    assert monitor.requests() == monitor_module.Requests()


def test_unknown_request_is_refused(tmp_path):
    with pytest.raises(ValueError, match="unknown request"):
        request(tmp_path, "explode")
