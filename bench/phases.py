"""Where an audit's time goes on real architectures: a Hugging Face ResNet-50 and a ViT-S/16.

Each model is built from its config (random init, nothing downloaded), saved with
``save_pretrained`` into a temporary folder, and audited end to end as ``auditor run`` does
(``run_audit`` then ``write_run``) on an ImageFolder of random 224-px images (3 classes ×
``--per-class``), methods gradcam and saliency, trust gate on, cache off. Each phase is timed by
wrapping the function that runs it, from the outside:

  predict+explain  auditor.audit.run_local          (decode, predict, explain: the batches), of which
  predict          auditor.explain.engine.predict   (the forward passes)
  explain          auditor.explain.engine.explain   (the explanation methods: the explain phase)
  trust            auditor.audit.cached_trust       (randomisation cascade and deletion test)
  fallback         auditor.judge.trust.fallback_maps (occlusion, when no method passed the gate)
  rules            auditor.audit.run_rules
  interventions    auditor.audit.cached_confirm
  report           auditor.audit... write_run       (findings.json, pictures, HTML, PDF), of which
  render           auditor.outputs.write.render_reports (HTML and PDF alone)

beside the model's own floor, measured on the same images in the same process: one forward pass
of every image (no gradient), and one forward and backward pass (input gradients) of every image.
Printed: seconds per phase (the median over ``--repeats`` audits), each as a multiple of the
forward+backward floor; the trust gate's time as a share of the explain phase (issue 14's goal: at
most 25% on ResNet-50) and of predict+explain, side by side, with each repeat's; and the gate's
parts (its record's ``timing``). ``--no-fallback`` sets trust.fallback null: on these random-init
models every method fails the gate, and the occlusion fallback then costs more than the rest;
``--gate-only`` runs no rules and no global views (the phases up to the gate, then an empty report).

    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python bench/phases.py                 # both models
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python bench/phases.py --models vit-s --per-class 2
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python bench/phases.py --models resnet50 --repeats 3 --no-fallback
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python bench/phases.py --models resnet50 --per-class 40 --explain-all \
        --no-fallback --gate-only     # the gate's share at 120 explained images, measured

Last, the gate's cost against the audit's size (``cost_table``): its fixed seconds, the explain phase's
seconds per explained image, the share at this size and projected to ``--at`` sizes, and the size at
which the share reaches 25%.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402

import auditor.audit  # noqa: E402
import auditor.explain.engine  # noqa: E402
import auditor.judge.trust  # noqa: E402
import auditor.outputs.write  # noqa: E402
from auditor.inputs.config import load_config  # noqa: E402

CLASSES = ("cat", "dog", "fox")
SIZE = 224
PHASES = {  # phase -> (module, function) wrapped to time it
    "predict+explain": (auditor.audit, "run_local"),
    "predict": (auditor.explain.engine, "predict"),
    "explain": (auditor.explain.engine, "explain"),
    "trust": (auditor.audit, "cached_trust"),
    "fallback": (auditor.judge.trust, "fallback_maps"),
    "rules": (auditor.audit, "run_rules"),
    "interventions": (auditor.audit, "cached_confirm"),
    "render": (auditor.outputs.write, "render_reports"),
}


def build(name: str):
    import transformers
    torch.manual_seed(0)
    labels = {"id2label": dict(enumerate(CLASSES)), "label2id": {c: i for i, c in enumerate(CLASSES)}}
    if name == "resnet50":  # microsoft/resnet-50's layout
        cfg = transformers.ResNetConfig(embedding_size=64, hidden_sizes=[256, 512, 1024, 2048], depths=[3, 4, 6, 3],
                                        layer_type="bottleneck", num_labels=3, **labels)
        return transformers.ResNetForImageClassification(cfg).eval()
    if name == "vit-s":  # ViT-S/16 (timm's vit_small_patch16_224 sizes)
        cfg = transformers.ViTConfig(image_size=SIZE, patch_size=16, hidden_size=384, num_hidden_layers=12,
                                     num_attention_heads=6, intermediate_size=1536, num_labels=3, **labels)
        return transformers.ViTForImageClassification(cfg).eval()
    raise SystemExit(f"unknown model {name!r}: resnet50 or vit-s")


def write_project(folder: Path, model, per_class: int, fallback: bool = True, gate_only: bool = False,
                  explain_all: bool = False) -> Path:
    model.save_pretrained(folder / "model")
    (folder / "model" / "preprocessor_config.json").write_text(json.dumps({
        "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": [0.485, 0.456, 0.406],
        "image_std": [0.229, 0.224, 0.225], "rescale_factor": 1 / 255, "size": {"height": SIZE, "width": SIZE}}))
    rng = np.random.default_rng(0)
    for c in CLASSES:
        (folder / "data" / c).mkdir(parents=True)
        for k in range(per_class):
            Image.fromarray(rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(folder / "data" / c / f"{k}.png")
    cfg = {"model": {"huggingface": "model"}, "data": {"root": "data"},
           "explain": {"methods": ["gradcam", "saliency"], **({"samples": "all"} if explain_all else {})},
           "trust": {"enabled": True, **({} if fallback else {"fallback": None})},
           "run": {"device": "cpu", "cache": False, "batch_size": 16}, "report": {"out": "reports"},
           **({"rules": {}, "views": {"enabled": False}} if gate_only else {})}
    (folder / "audit.yaml").write_text(yaml.safe_dump(cfg))
    return folder / "audit.yaml"


INSIDE = {"predict", "explain"}  # engine functions the fallback calls too: counted inside run_local only


def timed(times: dict, phase: str, fn, state: dict):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if phase in INSIDE and not state.get("explaining"):
            return fn(*args, **kwargs)
        state["explaining"] = state.get("explaining") or phase == "predict+explain"
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0
            if phase == "predict+explain":
                state["explaining"] = False
    return wrapper


def floor(model, n: int) -> dict:
    """The model's own cost on n images of the audit's size: forward (no gradient) and
    forward + backward to the input, in batches of 16 as the audit's run.batch_size."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, 3, SIZE, SIZE, generator=gen)
    out = {}
    with torch.no_grad():
        model(x[:1])  # warm-up
        t0 = time.perf_counter()
        for s in range(0, n, 16):
            model(x[s:s + 16])
        out["forward"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    for s in range(0, n, 16):
        xs = x[s:s + 16].clone().requires_grad_(True)
        torch.autograd.grad(model(xs).max(1).values.sum(), xs)
    out["forward+backward"] = time.perf_counter() - t0
    return out


def audit_once(path: Path, name: str) -> tuple[dict, object]:
    """One audit of the project at ``path`` (as ``auditor run``), every phase timed."""
    times: dict[str, float] = {}
    state: dict = {}
    saved = {phase: getattr(mod, fn) for phase, (mod, fn) in PHASES.items()}
    for phase, (mod, fn) in PHASES.items():
        setattr(mod, fn, timed(times, phase, saved[phase], state))
    try:
        t0 = time.perf_counter()
        res = auditor.audit.run_audit(load_config(path), quiet=True)
        times["audit (all)"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            auditor.outputs.write.write_run(res, path.parent / "reports")
        except Exception as e:  # noqa: BLE001  (the report is one phase; the others stand)
            print(f"{name}: the report failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            times.pop("render", None)
            times["report failed"] = 1.0
        times["report"] = time.perf_counter() - t0
    finally:
        for phase, (mod, fn) in PHASES.items():
            setattr(mod, fn, saved[phase])
    return times, res.record


def bench(name: str, per_class: int, repeats: int = 1, fallback: bool = True, gate_only: bool = False,
          explain_all: bool = False) -> dict:
    from auditor.inputs.huggingface import Logits
    model = build(name)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        path = write_project(Path(tmp), model, per_class, fallback, gate_only, explain_all)
        for k in range(repeats):
            times, record = audit_once(path, name)
            runs.append(times)
            print(f"{name} run {k + 1}: {json.dumps({p: round(v, 2) for p, v in times.items()})}", file=sys.stderr,
                  flush=True)
        explained = int(record.metrics.explained)
    lean = Logits(model)
    for p in lean.parameters():
        p.requires_grad_(False)
    base = floor(lean, per_class * len(CLASSES))
    times = {p: float(np.median([r.get(p, 0.0) for r in runs])) for p in {p for r in runs for p in r}}
    trust = record.run["trust"]
    return {"model": name, "images": per_class * len(CLASSES), "explained": explained, "times": times,
            "runs": runs, "floor": base,
            "trust_steps": {m: len(t.get("randomisation_steps", [])) for m, t in trust.items()},
            "trust_images": {m: t.get("images") for m, t in trust.items()},
            "deletion_images": {m: t.get("deletion_images") for m, t in trust.items() if "deletion_images" in t},
            "trust_timing": {m: t.get("timing") for m, t in trust.items() if t.get("timing")},
            "verdicts": {m: t.get("randomisation", "fallback" if t.get("fallback") else "-") + "/" +
                         t.get("deletion", "-") for m, t in trust.items()}}


def share(times: dict, of: str) -> float:
    return times.get("trust", 0.0) / max(times.get(of, 0.0), 1e-9)


def table(results: list[dict]) -> str:
    rows = ["predict+explain", "predict", "explain", "trust", "fallback", "rules", "interventions", "report",
            "render", "audit (all)"]
    head = "| phase | " + " | ".join(f"{r['model']} s | × fwd+bwd" for r in results) + " |"
    lines = [head, "|---" * (1 + 2 * len(results)) + "|"]
    for phase in rows:
        cells = []
        for r in results:
            t, fb = r["times"].get(phase, 0.0), r["floor"]["forward+backward"]
            cells += [f"{t:.2f}", f"{t / fb:.1f}"]
        lines.append(f"| {phase} | " + " | ".join(cells) + " |")
    for what in ("forward", "forward+backward"):
        cells = []
        for r in results:
            cells += [f"{r['floor'][what]:.2f}", f"{r['floor'][what] / r['floor']['forward+backward']:.1f}"]
        lines.append(f"| floor: {what} of every image | " + " | ".join(cells) + " |")
    lines.append("")
    for r in results:
        t, runs = r["times"], r.get("runs", [r["times"]])
        each = lambda of: ", ".join(f"{100 * share(x, of):.0f}%" for x in runs)  # noqa: E731
        lines.append(f"{r['model']}: {r['images']} images ({r['explained']} explained); trust gate (median of "
                     f"{len(runs)}) = {100 * share(t, 'explain'):.0f}% of the explain phase [{each('explain')}] "
                     f"(goal: at most 25%), {100 * share(t, 'predict+explain'):.0f}% of predict+explain "
                     f"[{each('predict+explain')}]; cascade steps {r['trust_steps']}, on {r['trust_images']} images; "
                     f"deletion decided on {r.get('deletion_images')} images; verdicts {r.get('verdicts')}"
                     + ("; the report failed (its time is to the failure)" if "report failed" in t else ""))
        for m, parts in r.get("trust_timing", {}).items():
            lines.append(f"  {m} gate parts (s, last run): {parts}")
    return "\n".join(lines)


def cost_model(r: dict) -> dict:
    """The gate's cost against the audit's size, from one result: the gate's seconds (fixed: it runs
    on at most trust.images test images whatever the audit's size; the median over the repeats) and the
    explain phase's seconds per explained image; the share at N explained images is then
    gate / (N x per image), and it reaches 25% at N = gate / (0.25 x per image)."""
    t = r["times"]
    gate, per_image = t.get("trust", 0.0), t.get("explain", 0.0) / max(r["explained"], 1)
    return {"gate": gate, "per_image": per_image, "test_images": max((v or 0) for v in r["trust_images"].values()),
            "share": gate / max(per_image * r["explained"], 1e-9), "n25": gate / max(0.25 * per_image, 1e-9)}


def cost_table(results: list[dict], at: list[int]) -> str:
    """Side by side per result: the gate's fixed seconds, the explain phase's seconds per explained image,
    the gate's share of the explain phase at the bench's size and projected to ``at`` explained images,
    and the audit size (explained images) at which the share is 25% (issue 14's goal)."""
    head = ("| model | explained | gate s (test images) | explain s / explained image | share here | "
            + " | ".join(f"share at {n}" for n in at) + " | 25% at |")
    lines = [head, "|---" * (6 + len(at)) + "|"]
    for r in results:
        c = cost_model(r)
        lines.append(f"| {r['model']} | {r['explained']} | {c['gate']:.1f} ({c['test_images']}) | {c['per_image']:.2f} | "
                     f"{100 * c['share']:.0f}% | " + " | ".join(f"{100 * c['gate'] / (c['per_image'] * n):.0f}%"
                                                          for n in at) + f" | {c['n25']:.0f} |")
    lines.append("(the gate runs on at most trust.images = 16 test images: a gate measured on fewer than 16 projects "
                 "low; explain's cost per image includes a second map for each error)")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,vit-s")
    ap.add_argument("--per-class", type=int, default=4, help="images per class (3 classes); at least 2")
    ap.add_argument("--repeats", type=int, default=1, help="audits per model; the table shows medians")
    ap.add_argument("--no-fallback", action="store_true", help="trust.fallback null (no occlusion fallback)")
    ap.add_argument("--gate-only", action="store_true", help="no rules and no global views: the phases up to the "
                    "trust gate, and an empty report")
    ap.add_argument("--explain-all", action="store_true", help="explain.samples all (every image explained; the "
                    "default explains the errors and 24 correct images per predicted class)")
    ap.add_argument("--at", default="120,1240", help="explained images to project the gate's share to (default: "
                    "this bench at --per-class 40, and a 10-class validation set of 10,000 at 90%% accuracy)")
    ap.add_argument("--save", help="a folder: each model's result as <model>.json")
    ap.add_argument("results", nargs="*", help="results saved earlier (--save), put in the table first")
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
    results = [json.loads(Path(f).read_text()) for f in args.results]
    for name in filter(None, args.models.split(",")):
        t0 = time.perf_counter()
        results.append(bench(name, max(2, args.per_class), max(1, args.repeats), not args.no_fallback,
                             args.gate_only, args.explain_all))
        print(f"{name}: done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        if args.save:
            Path(args.save, f"{name}.json").write_text(json.dumps(results[-1]))
    print(table(results))
    print()
    print(cost_table(results, [int(n) for n in args.at.split(",") if n]))


if __name__ == "__main__":
    main()
