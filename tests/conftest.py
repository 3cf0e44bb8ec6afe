"""Shared fixtures: a user-style project (model file, weights, ImageFolder data, config) in tmp_path."""
from __future__ import annotations

import os
import re

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import textwrap  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

torch.set_num_threads(2)

NET_PY = textwrap.dedent('''
    import torch
    from torch import nn

    def make(num_classes=3, width=8):
        torch.manual_seed(0)
        return nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, num_classes))
''')

CLASSES = ["cat", "dog", "fox"]


def report_folder(project, output: str) -> Path:
    """The run folder named on the CLI's "report:" line (other output may follow it)."""
    return project.folder / re.search(r"^report: (.+)$", output, re.M).group(1).strip()


def stable(doc: dict) -> dict:
    """findings.json without what legitimately differs between runs (times, ids, cache counts)."""
    return {"samples": doc["samples"], "class_findings": doc["class_findings"], "metrics": doc["metrics"],
            "skipped": doc["skipped"]}


def write_images(root: Path, per_class: int = 4, size: int = 24, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    for c in CLASSES:
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(per_class):
            arr = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(root / c / f"{c}_{k}.png")


@pytest.fixture
def project(tmp_path: Path):
    """A folder holding net.py, weights.safetensors, data/<class>/*.png and audit.yaml; returns the config path.

    ``project.cfg`` is the config as a dict; call ``project.write(cfg)`` after changing it.
    """
    from safetensors.torch import save_file

    (tmp_path / "net.py").write_text(NET_PY)
    ns: dict = {}
    exec(NET_PY, ns)
    save_file(ns["make"]().state_dict(), str(tmp_path / "weights.safetensors"))
    write_images(tmp_path / "data")
    cfg = {
        "model": {"factory": "net.py:make", "weights": "weights.safetensors", "classes": list(CLASSES),
                  "input": {"size": [16, 16], "channels": 3, "mean": [0.5], "std": [0.25]}},
        "data": {"root": "data"},
        "explain": {"methods": ["saliency"], "samples": "all", "resolution": 16},
        "report": {"out": "reports", "formats": ["json", "csv"], "fail_on": None},
        "run": {"batch_size": 5},
        "trust": {"enabled": False},  # an untrained model: the gate would (rightly) distrust it
    }

    class Project:
        path = tmp_path / "audit.yaml"
        folder = tmp_path

        def __init__(self):
            self.cfg = cfg
            self.write()

        def write(self, data=None):
            self.path.write_text(yaml.safe_dump(data if data is not None else self.cfg))
            return self.path

    return Project()
