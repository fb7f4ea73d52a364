"""One training subprocess at a time; further runs wait in a queue. A run lives in its own folder (`run.json`,
`train.log`, `images/`, `output/<name>/`) and outlives the browser tab that started it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..export import LORA_WEIGHTS_NAME
from ..monitor import read_metrics, request
from .command import REPO_ROOT

# The trainer never gets a Hub token: the app uploads results itself.
SECRET_ENVIRONMENT = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")
RESUME_FLAG = "--resume_from_checkpoint"


@dataclass
class Run:
    id: str
    folder: Path
    command: list[str]
    status: str = "queued"  # queued, running, finished, stopped, failed
    returncode: int | None = None
    process: subprocess.Popen | None = field(default=None, repr=False)

    @property
    def output_dir(self) -> Path:
        return Path(self.command[self.command.index("--output_dir") + 1])

    @property
    def log_path(self) -> Path:
        return self.folder / "train.log"

    def save(self) -> None:
        record = {"id": self.id, "command": self.command, "status": self.status, "returncode": self.returncode}
        (self.folder / "run.json").write_text(json.dumps(record, indent=1), encoding="utf-8")


def resume_command(command: list[str]) -> list[str]:
    """The same command, continuing from the output folder's latest checkpoint."""
    if RESUME_FLAG in command:
        return command
    return [*command, RESUME_FLAG, "latest"]


def child_environment() -> dict[str, str]:
    environment = {k: v for k, v in os.environ.items() if k not in SECRET_ENVIRONMENT}
    environment["PYTHONUNBUFFERED"] = "1"
    return environment


def executable(command: list[str]) -> list[str]:
    """`accelerate` from this Python's environment when it is there (a Space's or a virtualenv's)."""
    local = Path(sys.executable).parent / command[0]
    return [str(local) if local.exists() else shutil.which(command[0]) or command[0], *command[1:]]


def final_status(run: Run) -> str:
    """finished (final weights written), stopped (on request) or failed, from the run's own files."""
    events = [r["event"] for r in read_metrics(run.output_dir) if "event" in r]
    if run.returncode == 0 and events and events[-1] == "finished" and (run.output_dir / LORA_WEIGHTS_NAME).exists():
        return "finished"
    if run.returncode == 0 and events and events[-1] == "stopped":
        return "stopped"
    return "failed"


class RunManager:
    """The queue. `submit` and `resume` enqueue; a run starts when the one before it exits."""

    def __init__(self):
        self.runs: dict[str, Run] = {}
        self.queue: list[Run] = []
        self.active: Run | None = None
        self.lock = threading.Lock()

    def load_runs(self, root: Path) -> None:
        """Know the runs an earlier app process left in `root` (their `run.json`); one that was queued or running
        when that process ended is marked failed, so it can be resumed."""
        for record_path in sorted(root.glob("run-*/run.json")):
            record = json.loads(record_path.read_text(encoding="utf-8"))
            run = Run(record["id"], record_path.parent, record["command"], record["status"], record["returncode"])
            if run.status in ("queued", "running"):
                run.status = "failed"
                run.save()
            self.runs[run.id] = run

    def submit(self, folder: Path, command: list[str]) -> Run:
        run = Run(id=folder.name, folder=folder, command=command)
        with self.lock:
            self.runs[run.id] = run
            self._enqueue(run)
        return run

    def resume(self, run_id: str) -> Run:
        """Queue a stopped or failed run again with `--resume_from_checkpoint latest`."""
        with self.lock:
            run = self.runs[run_id]
            if run.status not in ("stopped", "failed"):
                raise ValueError(f"run {run_id} is {run.status}; only a stopped or failed run can be resumed.")
            run.command = resume_command(run.command)
            self._enqueue(run)
        return run

    def request(self, run_id: str, name: str) -> None:
        """stop / save / sample: a file the running trainer reads at its next step. Stopping a queued run
        takes it out of the queue."""
        with self.lock:
            run = self.runs[run_id]
            if name == "stop" and run in self.queue:
                self.queue.remove(run)
                run.status = "stopped"
                run.save()
                return
        if run.status == "running":
            request(run.output_dir, name)

    def position(self, run_id: str) -> int | None:
        """0 while running, n for the n-th waiting run, None otherwise."""
        with self.lock:
            run = self.runs[run_id]
            if run is self.active:
                return 0
            return self.queue.index(run) + 1 if run in self.queue else None

    def latest(self) -> Run | None:
        """The run to show on a freshly opened page: the running one, else the last one submitted."""
        with self.lock:
            if self.active is not None:
                return self.active
            return next(reversed(self.runs.values()), None)

    def wait(self, run_id: str, timeout: float | None = None) -> str:
        """Block until the run is no longer queued or running; return its status (for scripts and tests)."""
        run = self.runs[run_id]
        end = None if timeout is None else time.monotonic() + timeout
        while run.status in ("queued", "running"):
            if end is not None and time.monotonic() > end:
                raise TimeoutError(f"run {run_id} still {run.status} after {timeout} s")
            time.sleep(0.2)
        return run.status

    def _enqueue(self, run: Run) -> None:
        run.status, run.returncode = "queued", None
        run.save()
        self.queue.append(run)
        self._start_next()

    def _start_next(self) -> None:
        """Start the first queued run if none is running (caller holds the lock)."""
        if self.active is not None or not self.queue:
            return
        run = self.active = self.queue.pop(0)
        with open(run.log_path, "ab") as log:
            log.write(f"$ {' '.join(run.command)}\n".encode())
            log.flush()
            run.process = subprocess.Popen(
                executable(run.command),
                cwd=REPO_ROOT,
                env=child_environment(),
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
            )
        run.status = "running"
        run.save()
        threading.Thread(target=self._watch, args=(run,), daemon=True).start()

    def _watch(self, run: Run) -> None:
        returncode = run.process.wait()
        with self.lock:
            run.returncode = returncode
            run.status = final_status(run)
            run.save()
            self.active = None
            self._start_next()
