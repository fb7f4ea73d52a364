"""The run queue (one subprocess at a time), what a run's files say, the estimate, and the Hub push."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from sdxl_pivotal.monitor import TrainingMonitor
from sdxl_pivotal.space import results as results_module
from sdxl_pivotal.space.estimate import (
    CPU_PROCESS_GIB,
    HARDWARE,
    TINY_CPU_S_PER_STEP,
    Hardware,
    cached_memory,
    estimate,
    planned_memory,
)
from sdxl_pivotal.space.progress import loss_frame, read_progress, validation_images
from sdxl_pivotal.space.results import push_to_hub, write_results_zip
from sdxl_pivotal.space.runs import RunManager, resume_command

TOKEN = "hf_FAKEtokenThatMustNeverBeStored123"
# A stand-in trainer: records its environment and arguments, then ends as the real one does.
FAKE_TRAINER = """
import json, os, sys, time
out = sys.argv[sys.argv.index("--output_dir") + 1]
os.makedirs(out, exist_ok=True)
time.sleep(float(os.environ.get("FAKE_SLEEP", "0.5")))
open(os.path.join(out, "seen.json"), "w").write(json.dumps({"argv": sys.argv, "token": os.environ.get("HF_TOKEN")}))
open(os.path.join(out, "pytorch_lora_weights.safetensors"), "w").write("x")
open(os.path.join(out, "metrics.jsonl"), "a").write(json.dumps({"event": "finished", "step": 1}) + "\\n")
"""


def fake_command(tmp_path: Path, name: str) -> tuple[Path, list[str]]:
    folder = tmp_path / name
    folder.mkdir()
    return folder, [Path(sys.executable).name, "-c", FAKE_TRAINER, "--output_dir", str(folder / "output")]


def test_one_run_at_a_time_with_queue_positions(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    manager = RunManager()
    a = manager.submit(*fake_command(tmp_path, "a"))
    b = manager.submit(*fake_command(tmp_path, "b"))
    c = manager.submit(*fake_command(tmp_path, "c"))
    assert (manager.position(a.id), manager.position(b.id), manager.position(c.id)) == (0, 1, 2)
    assert (a.status, b.status) == ("running", "queued")
    manager.request(c.id, "stop")  # a queued run leaves the queue
    assert c.status == "stopped" and manager.position(c.id) is None
    assert manager.wait(a.id, 60) == "finished"
    assert manager.wait(b.id, 60) == "finished"
    assert not (c.folder / "output").exists()
    seen = json.loads((a.output_dir / "seen.json").read_text())
    assert seen["token"] is None  # the trainer never gets the Hub token
    assert json.loads((a.folder / "run.json").read_text())["status"] == "finished"
    assert "$ " in a.log_path.read_text()
    assert manager.latest() is c


def test_a_run_without_final_files_failed_and_resumes_with_latest(tmp_path):
    manager = RunManager()
    folder, command = fake_command(tmp_path, "a")
    command[2] = "raise SystemExit(1)"
    run = manager.submit(folder, command)
    assert manager.wait(run.id, 60) == "failed"
    command[2] = FAKE_TRAINER
    manager.resume(run.id)
    assert manager.wait(run.id, 60) == "finished"
    assert resume_command(run.command) == run.command  # not added twice
    assert run.command[-2:] == ["--resume_from_checkpoint", "latest"]
    with pytest.raises(ValueError, match="only a stopped or failed run"):
        manager.resume(run.id)


def test_runs_of_an_earlier_app_process_are_known_and_resumable(tmp_path):
    manager = RunManager()
    done = manager.submit(*fake_command(tmp_path, "run-1"))
    assert manager.wait(done.id, 60) == "finished"
    interrupted = manager.submit(*fake_command(tmp_path, "run-2"))
    interrupted.process.kill()  # as if the app process had died with it
    manager.wait(interrupted.id, 60)
    (interrupted.folder / "run.json").write_text(
        json.dumps({"id": "run-2", "command": interrupted.command, "status": "running", "returncode": None})
    )
    restarted = RunManager()
    restarted.load_runs(tmp_path)
    assert {i: r.status for i, r in restarted.runs.items()} == {"run-1": "finished", "run-2": "failed"}
    restarted.resume("run-2")
    assert restarted.wait("run-2", 60) == "finished"


def test_progress_loss_and_validation_images_from_the_run_files(tmp_path):
    monitor = TrainingMonitor(tmp_path, images_per_step=4)
    monitor.start(0, 10)
    for step, loss in enumerate([1.0, 0.5, 0.25], start=1):
        monitor.step_started()
        monitor.step_done(step, loss, 1e-4, epoch=0)
    progress = read_progress(tmp_path)
    assert (progress.step, progress.total) == (3, 10)
    assert progress.eta_s == pytest.approx(7 * progress.s_per_step)
    assert progress.summary().startswith("step 3 / 10")
    frame = loss_frame(tmp_path)
    smoothed = frame[frame.series == "smoothed"].loss.tolist()
    assert frame[frame.series == "loss"].loss.tolist() == [1.0, 0.5, 0.25]
    assert smoothed[0] == pytest.approx(1.0)  # debiased: the first point is the first loss
    assert smoothed[2] == pytest.approx((0.2 * 0.8**2 + 0.1 * 0.8 + 0.05) / (1 - 0.8**3))
    for folder in ["step-10", "step-2", "final"]:
        (tmp_path / "validation" / folder).mkdir(parents=True)
        (tmp_path / "validation" / folder / "0.png").write_bytes(b"")
    assert [label for _, label in validation_images(tmp_path)] == ["step 2", "step 10", "final"]


@pytest.mark.slow
def test_estimate_takes_memory_from_the_planner_and_time_from_measured_cpu_figures(tiny_model):
    from sdxl_pivotal.plan import GIB, parse_plan_args
    from sdxl_pivotal.plan import estimate as plan_estimate
    from sdxl_pivotal.space.command import trainer_arguments

    settings = {
        "pretrained_model_name_or_path": str(tiny_model),
        "instance_prompt": "a photo of TOK toy",
        "max_train_steps": 100,
        "train_batch_size": 2,
        "resolution": 64,
        "train_text_encoder_ti": True,
    }
    argv = trainer_arguments(settings)
    assert cached_memory(argv) is None
    memory = planned_memory(argv)  # in the app's worker process
    assert cached_memory(argv) is memory
    # The planner's own figure for the same command, computed here: the worker ran the planner, nothing else.
    assert memory.peak == plan_estimate(parse_plan_args(argv)[1]).peak

    cpu = estimate(settings, True, HARDWARE["cpu-basic"], memory)
    assert cpu.seconds == pytest.approx(100 * TINY_CPU_S_PER_STEP * 2 / 4 * (64 / 128) ** 2)
    assert cpu.memory_gib == pytest.approx(memory.peak / GIB + CPU_PROCESS_GIB)
    gpu = estimate(settings, False, HARDWARE["t4-small"], memory)
    assert gpu.seconds is None and gpu.memory_gib == memory.needed and "⚠️" not in gpu.markdown(HARDWARE["t4-small"])
    assert "No GPU time has been measured" in gpu.markdown(HARDWARE["t4-small"])
    floor = gpu.memory_floor_gib
    assert memory.weights / GIB < floor < memory.peak / GIB
    between = Hardware("a GPU between the floor and the peak", (floor + gpu.memory_gib) / 2, 0.0)
    assert "May not fit" in estimate(settings, False, between, memory).markdown(between)
    below = Hardware("a GPU below the floor", floor / 2, 0.0)
    assert "Will not fit" in estimate(settings, False, below, memory).markdown(below)

    assert "estimating" in estimate(settings, False, below, None).markdown(below)
    failed = planned_memory(["--pretrained_model_name_or_path", str(tiny_model / "missing"), "--instance_prompt", "x"])
    assert isinstance(failed, str) and "could not size" in failed
    assert "No memory estimate" in estimate(settings, False, below, failed).markdown(below)


@dataclass
class FakeHubApi:
    token: str | None
    calls: list = field(default_factory=list)

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return type("Repo", (), {"repo_id": kwargs["repo_id"]})()

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def test_push_is_private_by_default_and_the_token_stays_in_the_client(tmp_path, monkeypatch):
    apis = []
    monkeypatch.setattr(results_module, "hub_api", lambda token: apis.append(FakeHubApi(token)) or apis[-1])
    out = tmp_path / "my-lora"
    out.mkdir()
    (out / "pytorch_lora_weights.safetensors").write_bytes(b"x")
    url = push_to_hub(out, "someone/my-lora", TOKEN)
    assert url == "https://huggingface.co/someone/my-lora" and TOKEN not in url
    (_, kwargs), (_, upload_kwargs) = apis[0].calls
    assert apis[0].token == TOKEN
    assert kwargs["private"] is True
    assert "checkpoint-*" in upload_kwargs["ignore_patterns"] and "metrics.jsonl" in upload_kwargs["ignore_patterns"]
    write_results_zip(out, tmp_path / "my-lora.zip")
    for path in tmp_path.rglob("*"):
        assert path.is_dir() or TOKEN.encode() not in path.read_bytes()


WORKER_PARENT = """
import sys, time
from sdxl_pivotal.space import estimate
answer = estimate.planned_memory(["--pretrained_model_name_or_path", sys.argv[1], "--instance_prompt", "x"])
print("could not size" in answer, *estimate._POOL[0]._processes, flush=True)
time.sleep(600)
"""


def test_the_planner_worker_ends_with_an_app_killed_by_a_signal(tmp_path):
    """SIGKILL (or SIGTERM, which runs no clean-up either) of the app must not leave its idle worker behind."""
    import os
    import signal
    import subprocess
    import time

    app = subprocess.Popen(
        [sys.executable, "-c", WORKER_PARENT, str(tmp_path / "missing")], stdout=subprocess.PIPE, text=True
    )
    try:
        answered, worker = app.stdout.readline().split()
        assert answered == "True"
        worker = int(worker)
        os.kill(worker, 0)  # alive while the app is
        app.send_signal(signal.SIGKILL)
        app.wait(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                os.kill(worker, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            os.kill(worker, signal.SIGKILL)
            pytest.fail("the planner's worker outlived the app")
    finally:
        app.kill()
