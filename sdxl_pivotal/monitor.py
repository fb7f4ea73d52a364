"""What a running training shows outside itself, and what it can be asked from outside.

- `metrics.jsonl` in the output folder: one JSON object per optimizer step (step, loss, lr, s/step,
  images/s, epoch, wall-clock time), plus `{"event": ...}` lines when a run starts, stops on request or
  finishes. The Space's progress bar and loss plot read it; so can any script.
- Control files: another program (the Space) creates `control/stop`, `control/save` or `control/sample` in
  the output folder; at the end of the next optimizer step the trainer removes the file and stops after
  saving a checkpoint, saves a checkpoint, or makes validation images (and the --sample_prompts images).
  Resume a stopped run with `--resume_from_checkpoint latest`.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"
CONTROL_DIR = "control"
REQUESTS = ("stop", "save", "sample")


@dataclass(frozen=True)
class Requests:
    """What was asked from outside since the last step."""

    stop: bool = False
    save: bool = False
    sample: bool = False


def request(output_dir: str | Path, name: str) -> Path:
    """Ask a running training in `output_dir` to `stop`, `save` or `sample` at its next step."""
    if name not in REQUESTS:
        raise ValueError(f"unknown request {name!r}; use one of {', '.join(REQUESTS)}")
    folder = Path(output_dir) / CONTROL_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.touch()
    return path


def read_metrics(output_dir: str | Path) -> list[dict]:
    """Every record of the run's `metrics.jsonl` (a half-written last line is skipped)."""
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    records = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


class TrainingMonitor:
    """Writes the metrics of each step and reads the control files. Only the main process writes."""

    def __init__(self, output_dir: Path, images_per_step: int, enabled: bool = True):
        self.output_dir = Path(output_dir)
        self.images_per_step = images_per_step
        self.enabled = enabled
        self.step_start = time.time()

    def start(self, start_step: int, total_steps: int) -> None:
        """A run (new or resumed at `start_step`) begins: drop records of steps it will redo (after a crash past
        the last checkpoint) and stale requests, then record the start."""
        if not self.enabled:
            return
        self.output_dir.mkdir(parents=True, exist_ok=True)
        kept = [r for r in read_metrics(self.output_dir) if r.get("step", 0) <= start_step]
        lines = [json.dumps(r) + "\n" for r in kept]
        tmp = self.output_dir / f".{METRICS_FILE}.tmp"
        tmp.write_text("".join(lines), encoding="utf-8")
        tmp.replace(self.output_dir / METRICS_FILE)
        for name in REQUESTS:
            (self.output_dir / CONTROL_DIR / name).unlink(missing_ok=True)
        self.event("start", start_step, total_steps=total_steps)

    def step_started(self) -> None:
        self.step_start = time.time()

    def step_done(self, step: int, loss: float, lr: float, epoch: int) -> dict[str, float]:
        """Record optimizer step `step` (1-based); return the values for the trackers. The step's time runs from
        `step_started` (data loading included; checkpoints and validation images not)."""
        now = time.time()
        seconds = now - self.step_start
        values = {
            "loss": loss,
            "lr": lr,
            "s_per_step": seconds,
            "images_per_s": self.images_per_step / seconds if seconds > 0 else 0.0,
        }
        self._append({"step": step, **values, "epoch": epoch, "time": now})
        return values

    def event(self, name: str, step: int, **extra) -> None:
        self._append({"event": name, "step": step, "time": time.time(), **extra})

    def requests(self) -> Requests:
        """The requests waiting in the control folder, each removed as it is read."""
        if not self.enabled:
            return Requests()
        found = {}
        for name in REQUESTS:
            path = self.output_dir / CONTROL_DIR / name
            found[name] = path.exists()
            path.unlink(missing_ok=True)
        return Requests(**found)

    def _append(self, record: dict) -> None:
        if not self.enabled:
            return
        with open(self.output_dir / METRICS_FILE, "a", encoding="utf-8") as file:
            file.write(json.dumps(record) + "\n")
