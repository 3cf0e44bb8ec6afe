"""Every benchmark in one run: methods against their floors (with lime_image and Captum's Lime),
peak memory at 1x and 10x images with the rules-only rerun, and report render times.

    OMP_WAIT_POLICY=PASSIVE python bench/all.py [--quick]

The detection benchmark (bench/detection.py) measures quality, not speed; run it on its own.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
HERE = Path(__file__).parent

quick = "--quick" in sys.argv
steps = [
    ["methods.py"] + (["--images", "16", "--repeats", "2"] if quick else []),
    ["scale.py"] + (["--images", "100"] if quick else ["--images", "200"]),
    ["report.py"] + ([] if quick else ["--all"]),
]
for step in steps:
    print(f"\n== bench/{' '.join(step)}", flush=True)
    code = subprocess.call([sys.executable, str(HERE / step[0]), *step[1:]])
    if code:
        sys.exit(code)
