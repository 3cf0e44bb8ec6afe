"""Scale benchmark: peak memory at 1x and 10x the images, and what a rules-only rerun costs.

    OMP_WAIT_POLICY=PASSIVE python bench/scale.py [--images 300] [--factor 10]

Builds ImageFolders of N, factor/2*N and factor*N images from the demo's generators, audits each
through the CLI in a fresh process (every image explained, so heatmaps are as many as images),
and prints peak RSS of each run and the ratios (goal: <= 1.2x for factor*N against N; the middle
size shows whether what grows is bounded, caches filling up, or grows on with the data). Then reruns the larger audit
unchanged (a scheduled re-audit: predictions, heatmaps, trust gate and interventions all come
from the cache) and with only a rule setting changed (the interventions run again), and prints
their times as shares of the first run's. Medians are not needed here: each figure is one whole process, and the ratio is what
matters; run it twice if the machine is busy.
"""
from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def make_data(root: Path, n: int, seed: int = 0) -> None:
    from auditor.demo import synth
    from auditor.demo import CLASSES
    rng = np.random.default_rng(seed)
    for k in range(n):
        cls = CLASSES[k % len(CLASSES)]
        img = synth.noise_image(96, rng)
        (root / cls).mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(root / cls / f"{k:06d}.png")


def audit(config: Path, *overrides: str) -> tuple[float, float]:
    """(seconds, peak RSS in MB) of one CLI run in its own process."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "auditor.cli", "run", str(config), "--quiet"]
    for o in overrides:
        cmd += ["--set", o]
    r = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if r.returncode not in (0, 1):
        sys.exit(r.stdout + r.stderr)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    # ru_maxrss of children is the max over all children so far: run the small case first.
    return seconds, max(peak, before) / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--factor", type=int, default=10)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="auditor-scale-"))
    try:
        from auditor.demo import prepare
        prepare(work)  # the demo model and classes, trained once
        rows = []
        for n in (args.images, args.images * args.factor // 2, args.images * args.factor):
            make_data(work / f"data{n}", n)
            cfg = yaml.safe_load((Path(__file__).parents[1] / "audit.yaml").read_text())
            cfg.pop("prepare")
            cfg["data"] = {"root": f"data{n}"}
            cfg["explain"]["samples"] = "all"
            cfg["report"] = {"out": f"reports{n}", "formats": ["json", "csv"], "fail_on": None}
            config = work / f"audit{n}.yaml"
            config.write_text(yaml.safe_dump(cfg))
            seconds, peak = audit(config)
            rows.append((n, seconds, peak))
            print(f"{n:>7} images: {seconds:7.1f} s, peak RSS {peak:7.0f} MB", flush=True)
        (n1, _, p1), (nm, _, pm), (n2, t2, p2) = rows
        print(f"peak RSS growth for {n2 // n1}x the images: {p2 / p1:.2f}x (goal <= 1.2x); "
              f"from {nm} to {n2} images: {p2 / pm:.2f}x")
        same, _ = audit(work / f"audit{n2}.yaml")
        print(f"unchanged re-audit of {n2} images (a scheduled run): {same:.1f} s = {same / t2:.0%} of the first run's")
        rerun, _ = audit(work / f"audit{n2}.yaml", "rules={corner_border: {band: 0.2}}")
        print(f"rules-only rerun of {n2} images: {rerun:.1f} s = {rerun / t2:.0%} of the first run's {t2:.1f} s")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
