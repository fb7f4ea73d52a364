"""What a run's own files say while it runs: step / total, speed, ETA, the loss curve, validation images by step
and the end of the log. Read from `metrics.jsonl` (written by `sdxl_pivotal.monitor`) and the output folder."""

from __future__ import annotations

import re
import statistics
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ..monitor import read_metrics

STEP_FOLDER = re.compile(r"^step-(\d+)$")
ANSI_ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@dataclass
class Progress:
    step: int = 0
    total: int = 0
    s_per_step: float | None = None
    images_per_s: float | None = None

    @property
    def eta_s(self) -> float | None:
        return None if self.s_per_step is None else (self.total - self.step) * self.s_per_step

    def summary(self) -> str:
        if not self.total:
            return "waiting for the first step"
        text = f"step {self.step} / {self.total}"
        if self.s_per_step is not None:
            text += f" · {self.s_per_step:.2f} s/step · {self.images_per_s:.1f} images/s"
            text += f" · ETA {format_duration(self.eta_s)}"
        return text


def format_duration(seconds: float) -> str:
    minutes, secs = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {secs:02d} s"


def read_progress(output_dir: Path) -> Progress:
    """The latest step, the planned total, and the median speed of the last 10 steps."""
    records = read_metrics(output_dir)
    starts = [r for r in records if r.get("event") == "start"]
    steps = [r for r in records if "event" not in r]
    if not starts:
        return Progress()
    progress = Progress(step=steps[-1]["step"] if steps else starts[-1]["step"], total=starts[-1]["total_steps"])
    recent = steps[-10:]
    if recent:
        progress.s_per_step = statistics.median(r["s_per_step"] for r in recent)
        progress.images_per_s = statistics.median(r["images_per_s"] for r in recent)
    return progress


def loss_frame(output_dir: Path | None, smoothing: float = 0.8) -> pd.DataFrame:
    """Loss per step, raw and smoothed (exponential moving average, debiased as TensorBoard does), in the long
    form a line plot colours by `series`; empty without a run."""
    steps = [r for r in read_metrics(output_dir) if "event" not in r] if output_dir else []
    rows, average = [], 0.0
    for i, record in enumerate(steps, start=1):
        average = smoothing * average + (1 - smoothing) * record["loss"]
        rows.append({"step": record["step"], "loss": record["loss"], "series": "loss"})
        rows.append({"step": record["step"], "loss": average / (1 - smoothing**i), "series": "smoothed"})
    return pd.DataFrame(rows, columns=["step", "loss", "series"])


def validation_images(output_dir: Path) -> list[tuple[str, str]]:
    """(image path, "step N" or "final") for every validation image, by step, the final ones last."""
    folder = output_dir / "validation"
    if not folder.is_dir():
        return []
    groups = sorted((int(m.group(1)), p) for p in folder.iterdir() if (m := STEP_FOLDER.match(p.name)))
    labelled = [(f"step {step}", path) for step, path in groups]
    if (folder / "final").is_dir():
        labelled.append(("final", folder / "final"))
    return [(str(image), label) for label, path in labelled for image in sorted(path.glob("*.png"))]


def log_tail(path: Path, lines: int = 15) -> str:
    """The last lines of the run's log (progress-bar redraws split into lines, terminal escapes removed)."""
    if not path.is_file():
        return ""
    text = path.read_bytes()[-20000:].decode("utf-8", errors="replace").replace("\r", "\n")
    text = ANSI_ESCAPE.sub("", text)  # progress bars' cursor moves
    return "\n".join([line for line in text.splitlines() if line.strip()][-lines:])
