"""Peak memory of reading a `--dataset_name` dataset of phone-sized photos into the trainer's records.

    python benchmarks/dataset_memory.py --count 50 --photo_size 4032x3024
    python benchmarks/dataset_memory.py --repo /path/to/another/checkout   # the same figures for other code

Writes `--count` JPEG photos into a parquet dataset (the image files' bytes inside, as Hub datasets store them)
and into a local ImageFolder (files + metadata.jsonl), then for each, in a fresh process, runs the trainer's
`load_records` and builds its `DreamBoothDataset`, and prints that process's peak resident memory (VmHWM),
what it still holds then (VmRSS), and its peak after only importing the package. Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parent.parent

CHILD = r"""
import re, sys
from sdxl_pivotal.args import parse_args
from sdxl_pivotal.data import DreamBoothDataset, load_records
def memory_mb(field):  # VmHWM: this process's own peak (ru_maxrss would carry the parent's across exec)
    return int(re.search(field + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) / 1024
baseline = memory_mb("VmHWM")
args = parse_args(["--pretrained_model_name_or_path", "/nonexistent", "--instance_prompt", "a photo of TOK",
                   "--dataset_name", sys.argv[1], "--cache_dir", sys.argv[2], "--output_dir", sys.argv[3],
                   "--resolution", "1024"])
records = load_records(args)
dataset = DreamBoothDataset(records, args, seed=0)
import gc; gc.collect()
print(f"{len(records)} {baseline:.0f} {memory_mb('VmHWM'):.0f} {memory_mb('VmRSS'):.0f}")
"""


def write_photos(folder: Path, count: int, width: int, height: int) -> list[Path]:
    """`count` JPEGs of smooth colour with grain (about the size a phone writes)."""
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    paths = []
    for i in range(count):
        base = np.stack([xs / width * 255, ys / height * 255, np.full_like(xs, 40.0 * (i % 6))], axis=-1)
        grain = rng.normal(0, 6, size=(height, width, 1)).astype(np.float32)
        pixels = np.clip(base + grain, 0, 255).astype(np.uint8)
        path = folder / f"photo_{i:03d}.jpg"
        Image.fromarray(pixels).save(path, quality=90)
        paths.append(path)
    (folder / "metadata.jsonl").write_text("".join(json.dumps({"file_name": p.name}) + "\n" for p in paths))
    return paths


def write_parquet(folder: Path, photos: list[Path]) -> None:
    from datasets import Dataset
    from datasets import Image as ImageFeature

    dataset = Dataset.from_dict({"image": [{"bytes": p.read_bytes(), "path": None} for p in photos]})
    (folder / "data").mkdir(parents=True)
    dataset.cast_column("image", ImageFeature()).to_parquet(str(folder / "data" / "train-00000-of-00001.parquet"))


def measure(repo: Path, dataset: Path, work: Path) -> tuple[int, float, float, float]:
    env = {"PYTHONPATH": str(repo), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    cache = tempfile.mkdtemp(dir=work)
    result = subprocess.run(
        [sys.executable, "-c", CHILD, str(dataset), cache, str(work / "out")],
        capture_output=True,
        text=True,
        env=env,
        cwd=work,  # not the checkout this script is in: `python -c` imports from the working folder first
        check=True,
    )
    count, baseline, peak, kept = result.stdout.split()[-4:]
    return int(count), float(baseline), float(peak), float(kept)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--count", type=int, default=50)
    parser.add_argument("--photo_size", default="4032x3024", help="WxH")
    parser.add_argument("--repo", type=Path, default=REPO, help="checkout whose sdxl_pivotal is measured")
    options = parser.parse_args()
    width, height = map(int, options.photo_size.split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        photos = write_photos(work / "imagefolder", options.count, width, height)
        write_parquet(work / "parquet", photos)
        encoded = sum(p.stat().st_size for p in photos) / 2**20
        decoded = options.count * width * height * 3 / 2**20
        print(f"{options.count} photos {width}x{height}: {encoded:.0f} MB as JPEG, {decoded:.0f} MB decoded")
        print(f"code: {options.repo}")
        for source in ("parquet", "imagefolder"):
            count, baseline, peak, kept = measure(options.repo, work / source, work)
            print(
                f"  {source:<12} {count} records: peak RSS {peak:.0f} MB, {kept:.0f} MB held afterwards "
                f"(after imports: {baseline:.0f} MB)"
            )


if __name__ == "__main__":
    main()
