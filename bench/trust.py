"""The trust gate's randomisation test on a residual BatchNorm net trained on photo classes.

A small ResNet (stem, three residual blocks with BatchNorm, 19 modules with parameters) is
trained for a few epochs on 96-px crops of scikit-image's bundled photos and textures
(ImageNet-normalised); the gate then runs as the audit runs it (``trust_gate`` on an
``Evidence`` of the validation images). Printed per method: mean |Spearman| at a few points of
the cascade, the decisive step and its 95% interval over the images, the first step under the
threshold, the deletion test's fill and paired benefit with its interval, and the verdicts;
then, per method, the images its deletion test was decided on and the gate's parts in seconds.

    OMP_WAIT_POLICY=PASSIVE python bench/trust.py            # blocks cascade (the default)
    OMP_WAIT_POLICY=PASSIVE python bench/trust.py --full     # every cascade step, not only to the decisive one
    OMP_WAIT_POLICY=PASSIVE python bench/trust.py --compare  # also modules, and BatchNorm kept
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch import nn  # noqa: E402

import auditor.explain.methods  # noqa: E402,F401  (registers the methods)
from auditor.demo import synth  # noqa: E402
from auditor.inputs.config import InputSpec, TrustSpec  # noqa: E402
from auditor.inputs.data import SampleRef  # noqa: E402
from auditor.judge import trust  # noqa: E402
from auditor.judge.evidence import Evidence  # noqa: E402

CLASSES = ("brick", "grass", "gravel", "coins", "coffee", "chelsea")
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SIZE = 96
METHODS = ("guided_backprop", "saliency", "integrated_gradients", "gradcam")


class Block(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
        self.conv2, self.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
        self.relu1, self.relu2 = nn.ReLU(), nn.ReLU()
        self.down = (nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
                     if stride != 1 or cin != cout else None)

    def forward(self, x):
        y = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
        return self.relu2(y + (x if self.down is None else self.down(x)))


class ResNet3(nn.Module):
    """Stem (conv, BN), three residual blocks (16, 32, 64 channels), average pool, linear: 19
    modules with parameters."""

    def __init__(self, num_classes, w=16):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w), nn.ReLU())
        self.layer1, self.layer2, self.layer3 = Block(w, w, 1), Block(w, 2 * w, 2), Block(2 * w, 4 * w, 2)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x):
        return self.fc(self.layer3(self.layer2(self.layer1(self.stem(x)))).mean((2, 3)))


def data(n_per_class: int, seed: int):
    rng = np.random.default_rng(seed)
    images = [synth.texture_crop(c, SIZE, rng, crop_range=(0.2, 0.45)) for c in CLASSES for _ in range(n_per_class)]
    return np.stack(images), np.repeat(np.arange(len(CLASSES)), n_per_class)


def evidence(model, images, labels, folder: Path, spec: InputSpec) -> Evidence:
    """An Evidence over validation images written as PNG files, every one explained."""
    refs = []
    for i, (img, y) in enumerate(zip(images, labels)):
        path = folder / f"{i}.png"
        Image.fromarray(img).save(path)
        refs.append(SampleRef(path=path, rel=path.name, label=int(y)))
    ev = Evidence(classes=list(CLASSES), samples=pd.DataFrame(), heatmaps={}, contrast={}, refs=refs,
                  model=model, input_spec=spec, device=torch.device("cpu"))
    with torch.no_grad():
        pred = torch.cat([model(ev.model_inputs(range(s, min(s + 64, len(refs))))).argmax(1)
                          for s in range(0, len(refs), 64)]).numpy()
    ev.samples = pd.DataFrame({"label": labels, "prediction": pred, "correct": pred == labels, "explained": True})
    return ev


def table(out: dict, title: str) -> str:
    lines = [title, f"{'method':22} {'steps':>5} {'after 2':>8} {'decisive':>12} {'95% interval':>13} {'end':>6} "
                    f"{'1st<thr':>7}  {'randomisation':13} {'fill':5} {'deletion benefit (95%)':>26}  verdict"]
    for m, t in out.items():
        c = t.get("randomisation_spearman")
        if not c:
            lines.append(f"{m:22} {t['reason']}")
            continue
        n, d = len(t["randomisation_steps"]), t["decisive_step"]
        fb = "-" if t["first_below"] is None else str(t["first_below"] + 1)
        lo, hi = t["randomisation_ci"] or (float("nan"),) * 2
        end = f"{c[-1]:6.2f}" if len(c) == n else f"{'-':>6}"
        dl, dh = t["deletion_ci"]
        lines.append(f"{m:22} {n:5d} {c[min(1, len(c) - 1)]:8.2f} {c[d]:6.2f} ({d + 1:2d}) {lo:6.2f} to {hi:4.2f} "
                     f"{end} {fb:>7}  {t['randomisation']:13} {t['fill']:5} "
                     f"{t['deletion_benefit']:+.3f} ({dl:+.3f}, {dh:+.3f}) {t['deletion']:>12}  "
                     f"{'trusted' if t['reliable'] else 'NOT trusted'}")
    fills = next((t["fill_check"] for t in out.values() if t.get("fill_check")), {})
    lines.append("fill check (random removal of 30% alone): " + ", ".join(
        f"{f} flips {v['flip_rate']:.0%}, changes p by {v['probability_change']:.3f}" for f, v in fills.items()))
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--per-class", type=int, default=80)
    ap.add_argument("--images", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--compare", action="store_true", help="also the modules cascade and BatchNorm stats kept")
    ap.add_argument("--chart", type=Path, default=None, help="write the cascade chart (PNG) here")
    ap.add_argument("--full", action="store_true", help="run every cascade step (else down to the decisive one)")
    a = ap.parse_args(argv)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    t0 = time.perf_counter()
    xs, ys = data(a.per_class, a.seed)
    torch.manual_seed(a.seed)
    model = synth.train_classifier(ResNet3(len(CLASSES)), xs, ys, (SIZE, SIZE), MEAN, STD, a.epochs, a.seed)
    xv, yv = data(12, a.seed + 1)
    spec_in = InputSpec(size=(SIZE, SIZE), channels=3, mean=list(MEAN), std=list(STD))
    with tempfile.TemporaryDirectory() as tmp:
        ev = evidence(model, xv, yv, Path(tmp), spec_in)
        print(f"trained in {time.perf_counter() - t0:.0f} s; validation accuracy {ev.samples['correct'].mean():.0%}")
        layer = model.layer3.conv2
        methods = {m: {} for m in METHODS}
        spec = dict(images=a.images, full_cascade=a.full, curve=True)  # the table reads the curve
        runs = [("blocks cascade, BatchNorm statistics re-estimated (the gate's default)", TrustSpec(**spec),
                 "recalibrate")]
        if a.compare:
            runs += [("modules cascade (every module with parameters), BatchNorm re-estimated",
                      TrustSpec(**spec, cascade="modules"), "recalibrate"),
                     ("blocks cascade, BatchNorm statistics kept from training",
                      TrustSpec(**spec), "keep")]
        first = None
        for title, spec, bn in runs:
            t1 = time.perf_counter()
            trust.BATCHNORM = bn
            try:
                out = trust.trust_gate(ev, methods, layer, spec, a.seed)
            finally:
                trust.BATCHNORM = "recalibrate"
            first = first or out
            steps = next(iter(out.values())).get("randomisation_steps", [])
            print()
            print(table(out, f"{title}: {len(steps)} steps, {time.perf_counter() - t1:.0f} s"))
            print("steps (top first): " + ", ".join(steps))
            for m, t in out.items():  # where the gate's time went (its record's timing)
                if t.get("timing"):
                    print(f"{m}: deletion decided on {t['deletion_images']} of {t['images']} images; seconds "
                          + ", ".join(f"{k} {v:.2f}" for k, v in t["timing"].items()))
        if a.chart:
            from auditor.outputs.charts import cascade_chart
            print("chart:", cascade_chart(first, a.chart))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
