#!/usr/bin/env python
"""Full-size SDXL training speed and memory through the real trainer, without downloads.

    python benchmarks/benchmark_sdxl.py --out sdxl-figures     # GPU: SDXL base, 1024/768/512 px x bs 1/2/4
    python benchmarks/benchmark_sdxl.py --resolutions 1024 --batch_sizes 1 --variants recommended,8bit_adam
    python benchmarks/benchmark_sdxl.py --model tiny --resolutions 64 --batch_sizes 1   # CPU: the same at tiny size

The model: `--model sdxl-base` (default on CUDA) writes a diffusers folder from the real SDXL-base configs kept in
`sdxl_pivotal/configs/sdxl-base` with random weights drawn on the GPU (fp16 files, `--variant fp16`, about 7 GB;
kept in `--model_dir` for reuse), so the trainer loads it exactly as it loads SDXL from the Hub. Writing the files
takes well under a minute on a GPU machine and keeps the trainer's loading path (and its time) in the figures;
building the weights in memory instead would need a hook inside the trainer. `--model tiny|small` uses the
embedded small SDXL-architecture presets instead (CPU-sized; what the test runs).

Each configuration (resolution x batch size x variant) runs `sdxl_pivotal.train.train` in its own process (clean
peak memory) with the README's pivotal-tuning command plus prior preservation (`VARIANTS["recommended"]`): new
tokens, `--train_text_encoder_ti_frac 0.5`, min-SNR 5, rank 32, bf16, gradient checkpointing, and class images
(written beforehand, so none is generated). The run has two phases of `warmup + steps + 1` optimizer steps:
before the pivot (text encoders trained) and after it (encoders frozen and off the GPU). Per phase it prints
seconds per step and instance images per second over the `steps` timed steps (after `warmup`), and the FLOPs of
one step counted by `torch.utils.flop_counter.FlopCounterMode` (the last step of the phase, not timed; with
gradient checkpointing this includes the recomputed forward) and MFU = FLOPs / s / the device's dense bf16 peak
(`--peak_tflops`, known for H100/H200/A100). Per run: time to the first optimizer step (process start included),
peak memory of the training steps after the first (CUDA: allocated and reserved; CPU: bytes of live tensors,
counted by `sdxl_pivotal.plan.LiveTensorBytes`, and peak RSS) and up to the first step (loading included), and the
memory planner's estimate of the same command (`sdxl_pivotal.plan`, computed in CPU processes beside the runs)
with its error against the training steps' peak. Timing uses the trainer's progress bar: the `tqdm` name that
`sdxl_pivotal.train` imported is replaced by a subclass whose `update()` (once per optimizer step) takes a
timestamp after `torch.cuda.synchronize()`.

Results go to `--out`: `results.jsonl` (one JSON object per configuration) and `results.md` (a table).
`--time_budget S` stops starting configurations after S seconds (the GPU matrix fits a time slot).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

# Extra trainer flags of each variant, on top of the recommended command; None removes a flag.
VARIANTS: dict[str, dict[str, str | None]] = {
    "recommended": {},
    "no_checkpointing": {"--gradient_checkpointing": None},
    "8bit_adam": {"--use_8bit_adam": ""},
    "fused_adam": {"--adam_fused": ""},
    "cache_latents": {"--cache_latents": ""},
    "channels_last": {"--channels_last": ""},
    "compile": {"--compile": ""},
    "quantize_int8": {"--quantize_unet": "int8"},
    "quantize_fp8": {"--quantize_unet": "fp8"},
    # The low-VRAM combination (issue 16's goal: under 8 GB at 1024 px, batch 1, with checkpointing): the VAE
    # and text encoders leave the GPU once the latents are cached and the pivot is past.
    "low_vram": {"--quantize_unet": "int8", "--use_8bit_adam": "", "--cache_latents": ""},
}
# Dense bf16 tensor-core peak, TFLOP/s, by a substring of torch.cuda.get_device_name().
PEAK_TFLOPS = {"H200": 989.4, "H100 PCIe": 756.0, "H100": 989.4, "A100": 312.0}
INSTANCE_PROMPT = "a photo of TOK dog"


def recommended_flags(model_dir: Path, images: Path, classes: Path, resolution: int, batch: int, steps: int) -> dict:
    """The README's pivotal-tuning command (with prior preservation and rank 32), as {flag: value}."""
    vae_dir = model_dir / "vae-fp16-fix" if (model_dir / "vae-fp16-fix").is_dir() else model_dir / "vae"
    return {
        "--pretrained_model_name_or_path": str(model_dir),
        "--pretrained_vae_model_name_or_path": str(vae_dir),  # stands for madebyollin/sdxl-vae-fp16-fix
        "--instance_data_dir": str(images),
        "--instance_prompt": INSTANCE_PROMPT,
        "--train_text_encoder_ti": "",
        "--token_abstraction": "TOK",
        "--num_new_tokens_per_abstraction": "2",
        "--train_text_encoder_ti_frac": "0.5",
        "--text_encoder_lr": "3e-4",
        "--with_prior_preservation": "",
        "--class_prompt": "a photo of a dog",
        "--class_data_dir": str(classes),
        "--num_class_images": str(batch),
        "--resolution": str(resolution),
        "--train_batch_size": str(batch),
        "--gradient_accumulation_steps": "1",
        "--gradient_checkpointing": "",
        "--rank": "32",
        "--learning_rate": "1e-4",
        "--lr_warmup_steps": "0",
        "--snr_gamma": "5",
        "--max_train_steps": str(steps),
        "--checkpointing_steps": "1000000",
        "--report_to": "none",
        "--seed": "0",
        "--memory_plan": "False",  # estimated beside the run instead (below), not inside it
    }


def trainer_argv(flags: dict, variant: str, device: torch.device, output_dir: Path, variant_model: bool) -> list[str]:
    flags = {**flags, "--output_dir": str(output_dir), "--mixed_precision": "bf16" if device.type == "cuda" else "no"}
    if variant_model:
        flags["--variant"] = "fp16"
    for flag, value in VARIANTS[variant].items():
        if value is None:
            flags.pop(flag, None)
        else:
            flags[flag] = value
    argv = []
    for flag, value in flags.items():
        argv += [flag] if value == "" else [flag, value]
    return argv


def prepare_data(folder: Path, count: int, class_images: bool = True) -> tuple[Path, Path]:
    """Instance photos (the demo set) and `count` class images already in place (none is generated), or none
    (`class_images=False`: the trainer generates them with the base model, as a first run does)."""
    from sdxl_pivotal.tiny import write_demo_images

    images = write_demo_images(folder / "images", count=max(count, 4))
    classes = folder / "class-images"
    classes.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(sorted(images.glob("*.png"))[: count if class_images else 0]):
        (classes / f"class-{i}.png").write_bytes(path.read_bytes())
    return images, classes


def prepare_model(name: str, model_dir: Path, device: torch.device) -> Path:
    if (model_dir / "model_index.json").exists():
        return model_dir
    if name == "sdxl-base":
        from sdxl_pivotal.configs import save_random_sdxl

        save_random_sdxl(model_dir, device)
        torch.cuda.empty_cache()  # the runs are other processes: leave them the memory
        return model_dir
    from sdxl_pivotal.tiny import save_tiny_sdxl

    return save_tiny_sdxl(model_dir, name)


class PeakRSS:
    """The process's peak resident set size since the last `reset()` (Linux: VmHWM, reset through clear_refs)."""

    def read(self) -> int:
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM:")).split()[1]) * 1024

    def reset(self) -> None:
        Path("/proc/self/clear_refs").write_text("5")


def measure_phases(train_module, rss: PeakRSS, phases: dict[str, int]) -> None:
    """Record the peak RSS of the trainer's phases into `phases` by wrapping the functions that run them (the
    training steps and the final export are recorded by the caller)."""

    def wrap(name: str, function):
        def wrapped(*args, **kwargs):
            rss.reset()
            result = function(*args, **kwargs)
            phases[name] = rss.read()
            rss.reset()
            return result

        return wrapped

    for name, function in (
        ("class images", "load_class_records"),
        ("models", "build_models"),
        ("latent cache", "build_latent_cache"),
    ):
        setattr(train_module, function, wrap(name, getattr(train_module, function)))


def run_one(spec: dict) -> dict:
    """One configuration, in this process: train with timestamps per optimizer step and FLOP counts."""
    from torch.utils.flop_counter import FlopCounterMode

    import sdxl_pivotal.train as train_module
    from sdxl_pivotal.args import parse_args

    device = torch.device(spec["device"])
    args = parse_args(spec["argv"])
    phase = spec["warmup"] + spec["steps"] + 1
    count_at = {phase - 1, 2 * phase - 1}  # the last step of each phase: FLOPs counted, not timed
    stamps: list[float] = []
    flops: dict[int, int] = {}
    counter: list[FlopCounterMode] = []
    peaks: list[tuple[int, int]] = []  # per optimizer step: (allocated, reserved) bytes
    base_tqdm = train_module.tqdm

    class TimedTqdm(base_tqdm):
        def update(self, n=1):
            if device.type == "cuda":
                torch.cuda.synchronize()
            stamps.append(time.perf_counter())
            step = len(stamps) - 1  # the optimizer step just finished
            if rss is not None:
                phases["training steps"] = max(phases.get("training steps", 0), rss.read())
                rss.reset()
            # Peak memory of each step (step 0: since the start, loading included), then a fresh peak.
            if device.type == "cuda":
                peaks.append((torch.cuda.max_memory_allocated(), torch.cuda.max_memory_reserved()))
                torch.cuda.reset_peak_memory_stats()
            else:
                peaks.append((tracker.peak, 0))
                tracker.peak = tracker.live
            if counter:
                counter[0].__exit__(None, None, None)
                flops[step] = counter.pop().get_total_flops()
            if step + 1 in count_at and spec["count_flops"]:
                counter.append(FlopCounterMode(display=False))
                counter[0].__enter__()
            return super().update(n)

    train_module.tqdm = TimedTqdm
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    tracker, rss, phases = None, None, {}
    if device.type == "cpu":  # what torch.cuda.max_memory_allocated() reports on a GPU: live tensor bytes
        from sdxl_pivotal.plan import LiveTensorBytes

        tracker = LiveTensorBytes(device)
        if Path("/proc/self/clear_refs").exists():
            rss = PeakRSS()
            measure_phases(train_module, rss, phases)
    start = time.perf_counter()
    with tracker.mode if tracker else contextlib.nullcontext():
        train_module.train(args)
    if rss is not None:
        phases["export"] = rss.read()
    result = {key: spec[key] for key in ("resolution", "batch", "variant")}
    result["first_step_s"] = stamps[0] - start + spec["startup_s"]
    for name, first in (("before_pivot", 0), ("after_pivot", phase)):
        timed = range(first + spec["warmup"], first + spec["warmup"] + spec["steps"])
        durations = [stamps[k] - stamps[k - 1] for k in timed]
        seconds = sum(durations) / len(durations)
        step_flops = flops.get(first + phase - 1)
        result[name] = {"s_per_step": seconds, "images_per_s": spec["batch"] / seconds, "flops": step_flops}
        if step_flops and spec["peak_tflops"]:
            result[name]["mfu"] = step_flops / seconds / (spec["peak_tflops"] * 1e12)
    # Peaks of the training steps after the first (what the planner estimates) without the FLOP-counted ones
    # (the counter holds tensors longer), and up to the end of the first step (loading included).
    train_peaks = [peak for step, peak in enumerate(peaks) if step > 0 and step not in count_at]
    allocated, reserved = (max(p[i] for p in train_peaks) for i in (0, 1))
    # The pivot step also encodes every caption once (before the encoders leave the device); the others are steady.
    steady = max(peak[0] for step, peak in enumerate(peaks) if step > 0 and step not in count_at | {phase})
    result["steady_step_peak_gib"] = steady / 2**30
    result["first_step_peak_gib"] = peaks[0][0] / 2**30
    result["step_peaks_gib"] = [round(p[0] / 2**30, 4) for p in peaks]
    if device.type == "cuda":
        result["peak_allocated_gib"] = allocated / 2**30
        result["peak_reserved_gib"] = reserved / 2**30
    else:
        result["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
        result["peak_tensors_gib"] = allocated / 2**30
        result["peak_rss_by_phase_gib"] = {name: size / 2**30 for name, size in phases.items()}
    return result


def plan_peak(argv: list[str]) -> int:
    """The planner's estimate of a configuration's peak (run in a pool of CPU processes beside the GPU runs)."""
    from sdxl_pivotal.args import parse_args
    from sdxl_pivotal.plan import estimate

    return estimate(parse_args(argv)).peak


def table(results: list[dict]) -> str:
    memory = "peak alloc / reserved GiB" if "peak_allocated_gib" in results[0] else "peak tensors / RSS GiB"
    lines = [
        f"| res | bs | variant | s/step (pivot / after) | img/s (after) | TFLOP/step | MFU (after) | {memory} | "
        "planner GiB (error) | first step s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        a, b = r["before_pivot"], r["after_pivot"]
        mfu = f"{b['mfu']:.1%}" if "mfu" in b else "n/a"
        tflop = f"{b['flops'] / 1e12:.3g}" if b["flops"] else "n/a"
        if "peak_allocated_gib" in r:
            mem = f"{r['peak_allocated_gib']:.2f} / {r['peak_reserved_gib']:.2f}"
        else:
            mem = f"{r['peak_tensors_gib']:.3f} / {r['peak_rss_gib']:.2f}"
        plan = f"{r['plan_gib']:.2f}" if "plan_gib" in r else "n/a"
        if "plan_error" in r:
            plan += f" ({r['plan_error']:+.0%})"
        lines.append(
            f"| {r['resolution']} | {r['batch']} | {r['variant']} | {a['s_per_step']:.3f} / {b['s_per_step']:.3f} | "
            f"{b['images_per_s']:.2f} | {tflop} | {mfu} | {mem} | {plan} | {r['first_step_s']:.1f} |"
        )
    return "\n".join(lines)


def parse_cli(argv: list[str]) -> argparse.Namespace:
    cuda = torch.cuda.is_available()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl-base" if cuda else "tiny", choices=["sdxl-base", "tiny", "small"])
    parser.add_argument("--model_dir", default=None, help="keep (or reuse) the model folder here")
    parser.add_argument("--resolutions", default=None, help="comma-separated; default 1024,768,512 (tiny: 64)")
    parser.add_argument("--batch_sizes", default="1,2,4")
    parser.add_argument("--variants", default="recommended", help=f"comma-separated, of {', '.join(VARIANTS)}")
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per phase")
    parser.add_argument("--warmup_steps", type=int, default=2, help="untimed steps before them, per phase")
    parser.add_argument("--peak_tflops", type=float, default=None, help="device peak for MFU; default: known GPUs")
    parser.add_argument("--no_plan", action="store_true", help="skip the planner's estimate")
    parser.add_argument(
        "--generate_class_images", action="store_true", help="let the trainer generate the class images (timed)"
    )
    parser.add_argument("--time_budget", type=float, default=None, help="start no configuration after S seconds")
    parser.add_argument("--out", default="benchmark-sdxl", help="folder for results.jsonl and results.md")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    if options.model == "sdxl-base" and not cuda:
        parser.error("full-size SDXL needs a CUDA GPU; on a CPU use --model tiny or small")
    if options.warmup_steps < 1 or options.steps < 1:
        parser.error("--warmup_steps and --steps must be at least 1")
    if options.resolutions is None:
        options.resolutions = "1024,768,512" if options.model == "sdxl-base" else "64"
    return options


def main(argv: list[str] | None = None) -> None:
    started = time.perf_counter()
    options = parse_cli(sys.argv[1:] if argv is None else argv)
    if options.child:
        spec = json.loads(Path(options.child).read_text())
        spec["startup_s"] = time.perf_counter() - spec.pop("launched")
        print("RESULT " + json.dumps(run_one(spec)), flush=True)
        return
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    peak_tflops = options.peak_tflops
    if peak_tflops is None and device.type == "cuda":
        name = torch.cuda.get_device_name()
        peak_tflops = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    out = Path(options.out)
    out.mkdir(parents=True, exist_ok=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = Path(options.model_dir) if options.model_dir else tmp / "model"
        t0 = time.perf_counter()
        prepare_model(options.model, model_dir, device)
        print(f"model {options.model} ready in {model_dir} ({time.perf_counter() - t0:.0f} s)", flush=True)
        batches = [int(b) for b in options.batch_sizes.split(",")]
        images, classes = prepare_data(tmp / "data", max(batches), not options.generate_class_images)
        total = 2 * (options.warmup_steps + options.steps + 1)
        specs = []
        for variant in options.variants.split(","):
            for resolution in (int(r) for r in options.resolutions.split(",")):
                for batch in batches:
                    flags = recommended_flags(model_dir, images, classes, resolution, batch, total)
                    run_dir = tmp / f"run-{variant}-{resolution}-{batch}"
                    argv = trainer_argv(flags, variant, device, run_dir, options.model == "sdxl-base")
                    specs.append(
                        dict(
                            argv=argv,
                            device=device.type,
                            resolution=resolution,
                            batch=batch,
                            variant=variant,
                            warmup=options.warmup_steps,
                            steps=options.steps,
                            peak_tflops=peak_tflops,
                            # A dispatch mode around compiled blocks would make them recompile: not counted.
                            count_flops=variant != "compile",
                        )
                    )
        plans = start_plans(specs) if not options.no_plan else {}
        for index, spec in enumerate(specs):
            name = f"{spec['resolution']} px bs {spec['batch']} {spec['variant']}"
            if options.time_budget and time.perf_counter() - started > options.time_budget:
                print(f"time budget spent: skipping {name}", flush=True)
                if index in plans:
                    plans.pop(index).cancel()
                continue
            spec_file = tmp / f"spec-{index}.json"
            spec_file.write_text(json.dumps(spec))
            result = run_child(spec_file)
            if result is None:
                print(f"FAILED: {name}", flush=True)
                continue
            if index in plans:
                add_plan(result, plans.pop(index).result())
            results.append(result)
            with open(out / "results.jsonl", "a") as f:
                f.write(json.dumps(result) + "\n")
            print(table([result]).splitlines()[-1], flush=True)
    if results:
        header = f"device: {describe_device(device)}; model {options.model}\n\n"
        text = header + table(results) + "\n" + phase_lines(results)
        (out / "results.md").write_text(text)
        print("\n" + text)


def phase_lines(results: list[dict]) -> str:
    """CPU: the peak RSS of each phase of each run."""
    lines = []
    for r in results:
        if r.get("peak_rss_by_phase_gib"):
            phases = ", ".join(f"{name} {size:.2f}" for name, size in r["peak_rss_by_phase_gib"].items())
            lines.append(f"- {r['resolution']} px bs {r['batch']} {r['variant']}: peak RSS GiB by phase: {phases}")
    return "\n".join(lines) + ("\n" if lines else "")


def start_plans(specs: list[dict]) -> dict:
    """{index: future of the planner's estimate} for every configuration, computed in CPU processes."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    workers = max(1, min(len(specs), (os.cpu_count() or 2) // 2))
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"))
    futures = {i: pool.submit(plan_peak, spec["argv"]) for i, spec in enumerate(specs)}
    pool.shutdown(wait=False)  # no work after these; skipped configurations cancel theirs
    return futures


def add_plan(result: dict, estimate: int) -> None:
    """The planner's estimate and its error against the measured peak of the training steps."""
    measured = result.get("peak_allocated_gib", result.get("peak_tensors_gib")) * 2**30
    result["plan_gib"] = estimate / 2**30
    result["plan_error"] = estimate / measured - 1
    result["plan_error_steady"] = estimate / (result["steady_step_peak_gib"] * 2**30) - 1


def run_child(spec_file: Path) -> dict | None:
    """Run one configuration in a fresh process; its result, or None when it failed (its output is shown)."""
    spec = json.loads(spec_file.read_text())
    spec["launched"] = time.perf_counter()
    spec_file.write_text(json.dumps(spec))
    command = [sys.executable, __file__, "--child", str(spec_file)]
    completed = subprocess.run(command, capture_output=True, text=True, env=os.environ.copy())
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        print(completed.stdout[-3000:] + completed.stderr[-6000:], flush=True)
        return None
    return json.loads(lines[-1].removeprefix("RESULT "))


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name()}, torch {torch.__version__}"
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} threads), torch {torch.__version__}"


if __name__ == "__main__":
    main()
