"""Pivotal tuning's two phases: seconds per optimizer step and peak memory before and after the pivot, with
`--train_text_encoder_ti` on and off, in one process.

    python benchmarks/benchmark_pivot.py --preset tiny --steps 24 --threads 1
    python benchmarks/benchmark_pivot.py --preset small --steps 12 -- --mixed_precision bf16

Each configuration runs the real trainer for `--steps` optimizer steps with `--train_text_encoder_ti_frac
0.5`; steps are timed with the hook of `benchmark_step.py`. Before the pivot the new token rows are trained:
both text encoders run forward and backward every step. After it they are frozen, the encoders run without
gradients and each distinct caption is encoded once, so the second phase should be cheaper. Without pivotal
tuning both halves are plain UNet LoRA steps: the baseline. The first `--warmup_steps` of each phase are not
counted. Peak memory per phase is torch.cuda.max_memory_allocated (reset at the pivot) on a GPU; on the
CPU only the process's peak RSS is available, printed once per run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchmark_step import INSTANCE_PROMPT, peak_memory, reset_peak_memory, run_trainer

from sdxl_pivotal.args import parse_args
from sdxl_pivotal.tiny import PRESETS, save_tiny_sdxl, write_demo_images


def measure(options, extra: list[str], ti: bool, model: Path, images: Path, output_dir: Path, device) -> dict:
    argv = [
        "--pretrained_model_name_or_path", str(model), "--instance_data_dir", str(images),
        "--instance_prompt", INSTANCE_PROMPT, "--output_dir", str(output_dir),
        "--resolution", str(options.resolution), "--train_batch_size", str(options.train_batch_size),
        "--max_train_steps", str(options.steps), "--checkpointing_steps", str(options.steps + 1),
        "--report_to", "none", "--seed", "0", "--train_text_encoder_ti_frac", "0.5", "--text_encoder_lr", "1e-3",
    ]  # fmt: skip
    if ti:
        argv.append("--train_text_encoder_ti")
    args = parse_args(argv + extra)
    pivot = round(0.5 * options.steps)
    memory = {}

    def at_step(done: int) -> None:
        if done == pivot:
            memory["before"] = peak_memory(device)
            reset_peak_memory(device)

    reset_peak_memory(device)
    timing = argparse.Namespace(warmup_steps=0, steps=options.steps)
    times = run_trainer(args, timing, device, on_step=at_step)["trainer"]
    memory["after"] = peak_memory(device)
    warm = options.warmup_steps
    return dict(before=times[warm:pivot], after=times[pivot + warm :], memory=memory)


def main() -> None:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--resolution", type=int, default=None, help="default: 128 for tiny, 256 for small")
    parser.add_argument("--train_batch_size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps; the pivot is at half")
    parser.add_argument("--warmup_steps", type=int, default=2, help="uncounted steps at the start of each phase")
    parser.add_argument("--threads", type=int, default=None)
    options = parser.parse_args(argv)
    options.resolution = options.resolution or (128 if options.preset == "tiny" else 256)
    if options.threads:
        torch.set_num_threads(options.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")

    with tempfile.TemporaryDirectory(prefix="sdxl-pivot-bench-") as tmp:
        tmp = Path(tmp)
        model = save_tiny_sdxl(tmp / "model", options.preset)
        images = write_demo_images(tmp / "images", count=8)
        results = {ti: measure(options, extra, ti, model, images, tmp / f"run-{ti}", device) for ti in (False, True)}

    print(f"\n=== {options.preset}, {options.resolution} px, batch {options.train_batch_size}, {device} ===")
    for ti, result in results.items():
        before, after = statistics.median(result["before"]), statistics.median(result["after"])
        label = "pivotal tuning on " if ti else "pivotal tuning off"
        print(
            f"{label}: before the pivot {before:.4f} s/step, after {after:.4f} s/step "
            f"(after/before {after / before:.3f}x; medians of {len(result['before'])} and {len(result['after'])})"
        )
        print(f"    peak memory before: {result['memory']['before']}; after: {result['memory']['after']}")
    on, off = results[True], results[False]
    print(
        f"phase 1 cost of pivotal tuning: {statistics.median(on['before']) / statistics.median(off['before']):.3f}x "
        f"the plain LoRA step; phase 2: {statistics.median(on['after']) / statistics.median(off['after']):.3f}x"
    )


if __name__ == "__main__":
    main()
