"""What rules read (Evidence) and what they return (Finding, ClassFinding)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch

from auditor.config import SEVERITIES
from auditor.data import SampleRef, read_image, to_model_input


@dataclass
class Finding:
    """A suspicion about one image. ``bbox`` is in the pixel coordinates of the image file."""
    sample: int
    rule: str
    severity: str
    score: float
    message: str
    method: str | None = None
    bbox: list[float] | None = None
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        del d["sample"]
        return d


@dataclass
class ClassFinding:
    """A suspicion about how the model decides one class. ``share``: of that class's explained images."""
    cls: str
    rule: str
    severity: str
    score: float
    share: float
    message: str
    method: str | None = None
    region: list[float] | None = None      # [x0, y0, x1, y1] as fractions of the image
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d["class"] = d.pop("cls")
        return d


def severity_rank(s: str | None) -> int:
    return -1 if s is None else SEVERITIES.index(s)


def grade(value: float, thresholds: dict[str, float]) -> str | None:
    """The highest severity whose threshold ``value`` reaches; None below all of them."""
    best = None
    for sev, t in thresholds.items():
        if value >= t and severity_rank(sev) > severity_rank(best):
            best = sev
    return best


CACHE_IMAGES = 512            # decoded model inputs kept by Evidence.model_input ...
CACHE_BYTES = 64 * 2 ** 20    # ... and at most this much of them (111 inputs at 224 px)


@dataclass
class Evidence:
    """Everything the audit learned about the data, in the shape rules need.

    ``samples`` has one row per decoded image (index = sample id): rel, label, prediction,
    confidence, correct, explained, width, height. ``heatmaps[method][i]`` is image i's heatmap
    for its predicted class, ``contrast[method][i]`` for its true class (misclassified only):
    float16 arrays at a common analysis resolution, raw (not normalised).
    """
    classes: list[str]
    samples: pd.DataFrame
    heatmaps: dict[str, dict[int, np.ndarray]]
    contrast: dict[str, dict[int, np.ndarray]]
    refs: list[SampleRef]
    model: torch.nn.Module | None = None
    input_spec: Any = None
    device: torch.device | None = None
    reliable: dict[str, bool] = field(default_factory=dict)
    _inputs: OrderedDict = field(default_factory=OrderedDict, repr=False)  # decoded, least recent first

    @property
    def methods(self) -> list[str]:
        return [m for m in self.heatmaps if self.reliable.get(m, True)]

    def explained(self, method: str, target: str = "pred") -> tuple[list[int], np.ndarray]:
        """Sample ids and their stacked heatmaps [N, h, w] (float32) for one method: a fresh array
        the caller owns (rules normalise it in place)."""
        store = (self.heatmaps if target == "pred" else self.contrast)[method]
        ids = sorted(store)
        if not ids:
            return [], np.zeros((0, 1, 1), np.float32)
        return ids, np.stack([store[i] for i in ids]).astype(np.float32, copy=False)

    def model_input(self, i: int) -> torch.Tensor:
        """Image i decoded and preprocessed as the model saw it: [C, H, W] on the host.

        The most recent ``CACHE_IMAGES`` (at most ``CACHE_BYTES``) are kept (rules, the trust gate
        and the interventions ask for the same images again); callers must not modify the tensor
        in place."""
        if i in self._inputs:
            self._inputs.move_to_end(i)
        else:
            self._inputs[i] = x = to_model_input(read_image(self.refs[i].path), self.input_spec)
            # Bounded: memory must not grow with the data set (nor with the model's input size).
            limit = min(CACHE_IMAGES, max(1, CACHE_BYTES // (x.numel() * x.element_size())))
            while len(self._inputs) > limit:
                self._inputs.popitem(last=False)
        return self._inputs[i]

    def to_file_bbox(self, i: int, frac_box) -> list[float]:
        """A box given as fractions of the image [x0, y0, x1, y1] in image i's file pixels."""
        w, h = self.samples.at[i, "width"], self.samples.at[i, "height"]
        x0, y0, x1, y1 = frac_box
        return [round(float(x0 * w), 1), round(float(y0 * h), 1), round(float(x1 * w), 1), round(float(y1 * h), 1)]
