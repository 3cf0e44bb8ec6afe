"""What rules read (Evidence) and what they return (Finding, ClassFinding)."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Annotated, Any

import numpy as np
import pandas as pd
import torch
from pydantic import Field

from auditor.explain.heatmap import tight_boxes
from auditor.inputs.config import Severity
from auditor.inputs.data import SampleRef, input_view, read_image, to_model_input
from auditor.record import severity_rank  # noqa: F401  (rules grade with it)


# Parameter types with their ranges, for rule signatures: the registry validates configured
# params against them before any work.
Count = Annotated[int, Field(ge=1)]
Share = Annotated[float, Field(gt=0, le=1)]
Band = Annotated[float, Field(gt=0, le=0.5)]        # a corner square's or border strip's side, of the image's
Positive = Annotated[float, Field(gt=0)]
NonNegative = Annotated[float, Field(ge=0)]
Thresholds = dict[Severity, float] | None           # severity -> the score that reaches it


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


def grade(value: float, thresholds: dict[str, float]) -> str | None:
    """The highest severity whose threshold ``value`` reaches; None below all of them."""
    best = None
    for sev, t in thresholds.items():
        if value >= t and severity_rank(sev) > severity_rank(best):
            best = sev
    return best


CACHE_IMAGES = 512            # decoded model inputs kept by Evidence.model_input ...
CACHE_BYTES = 64 * 2 ** 20    # ... and at most this much of them (111 inputs at 224 px)
PIXELS_BYTES = 32 * 2 ** 20   # file-resolution images kept by Evidence.pixels


class BoundedCache(OrderedDict):
    """The most recently used values, at most ``max_items`` of them and ``max_bytes`` in all (but
    always the newest): memory must not grow with the data set, nor with the image size."""

    def __init__(self, max_items: int, max_bytes: int):
        super().__init__()
        self.max_items, self.max_bytes, self.bytes = max_items, max_bytes, 0

    def get_or_make(self, key, make):
        if key in self:
            self.move_to_end(key)
            return self[key]
        self[key] = value = make()
        self.bytes += value.nbytes
        while len(self) > 1 and (len(self) > self.max_items or self.bytes > self.max_bytes):
            self.bytes -= self.popitem(last=False)[1].nbytes
        return value


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
    layer: torch.nn.Module | None = None     # the layer Grad-CAM-style methods read (model.target_layer or the default)
    _inputs: BoundedCache = field(default_factory=lambda: BoundedCache(CACHE_IMAGES, CACHE_BYTES), repr=False)
    _pixels: BoundedCache = field(default_factory=lambda: BoundedCache(CACHE_IMAGES, PIXELS_BYTES), repr=False)

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

        The most recent are kept (``CACHE_IMAGES``, at most ``CACHE_BYTES``: rules, the trust gate
        and the interventions ask for the same images again); callers must not modify the tensor
        in place."""
        return self._inputs.get_or_make(i, lambda: to_model_input(read_image(self.refs[i].path),
                                                                  self.input_spec))

    def model_inputs(self, ids) -> torch.Tensor:
        """Images ``ids`` as the model saw them, stacked on the model's device: [N, C, H, W]."""
        return torch.stack([self.model_input(i) for i in ids]).to(self.device)

    def pixels(self, i: int) -> np.ndarray:
        """Image i's file pixels as RGB in [0, 1], float32 [H, W, 3]; the most recent are kept
        (at most ``PIXELS_BYTES``); callers must not modify the array in place."""
        return self._pixels.get_or_make(
            i, lambda: np.asarray(read_image(self.refs[i].path).convert("RGB"), np.float32) / 255.0)

    def seen_pixels(self, i: int) -> np.ndarray:
        """Image i's file pixels (as ``pixels``) cut to the part the model input shows, so that a
        box found in them is in fractions of the model input, as rules give boxes."""
        v = input_view((self.samples.at[i, "width"], self.samples.at[i, "height"]), self.input_spec)
        x0, y0, x1, y1 = (int(round(c)) for c in v.box)
        return self.pixels(i)[y0:y1, x0:x1]

    def boxes(self, i: int, heat: np.ndarray | None, region) -> list[tuple[float, float, float, float]]:
        """Candidate boxes (fractions of the model input) for a finding on image i, best first: the
        object image i shows at the connected evidence region of ``heat`` inside ``region``, that
        evidence region, then ``region`` itself (``auditor.explain.heatmap.tight_boxes``). An
        image that cannot be read leaves the evidence region and ``region``."""
        try:
            img = self.seen_pixels(i)
        except (OSError, ValueError):
            img = None
        return tight_boxes(heat, img, region)

    def to_input_frac(self, i: int, file_bbox) -> tuple[float, float, float, float]:
        """A box in image i's file pixels as fractions of the model input (``to_file_bbox`` undone)."""
        v = input_view((self.samples.at[i, "width"], self.samples.at[i, "height"]), self.input_spec)
        x0, y0, x1, y1 = v.box
        w, h = x1 - x0, y1 - y0
        return ((file_bbox[0] - x0) / w, (file_bbox[1] - y0) / h, (file_bbox[2] - x0) / w, (file_bbox[3] - y0) / h)

    def to_file_bbox(self, i: int, frac_box) -> list[float]:
        """A box given as fractions of the model input [x0, y0, x1, y1] in image i's file pixels,
        through the resize and crop the model input was made by (``input_view``)."""
        v = input_view((self.samples.at[i, "width"], self.samples.at[i, "height"]), self.input_spec)
        return [round(float(c), 1) for c in v.to_file(frac_box)]
