"""The audit's heavy step, one batch at a time: decode → predict → explain → keep small records.

``process_batch`` is a pure function of (context, batch), so an engine that runs it elsewhere
(a worker pool, a cluster) gives the same records. ``run_local`` is the in-process engine.
Memory is bounded by the heatmaps kept for rules: float16 at ``explain.resolution``.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from auditor.config import AuditConfig
from auditor.data import Batch, SampleRef, batches
from auditor.registry import METHODS


@dataclass
class Context:
    cfg: AuditConfig
    model: torch.nn.Module
    device: torch.device
    layer: torch.nn.Module | None
    methods: dict[str, dict]             # name -> params, as configured
    support: dict[int, int]              # images per true class, for the per-class sample
    refs: list[SampleRef]
    disabled: dict[str, str] = field(default_factory=dict)   # method -> why it stopped


@dataclass
class Records:
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    heatmaps: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)
    contrast: dict[str, dict[int, np.ndarray]] = field(default_factory=dict)


def _uniform(rel: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per image: selection independent of batch order."""
    digest = hashlib.blake2b(f"{seed}:{rel}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def select(ctx: Context, idx: list[int], labels: torch.Tensor, pred: torch.Tensor, conf: torch.Tensor) -> list[bool]:
    spec = ctx.cfg.explain
    out = []
    for j, i in enumerate(idx):
        wrong = bool(pred[j] != labels[j])
        if spec.samples == "all" or wrong or (spec.samples == "low_confidence" and conf[j] < spec.threshold):
            out.append(True)
            continue
        # A seeded sample of correct images per class, for class-level comparisons.
        share = spec.per_class / max(ctx.support.get(int(labels[j]), 1), 1)
        out.append(_uniform(ctx.refs[i].rel, ctx.cfg.run.seed) < share)
    return out


def explain(ctx: Context, name: str, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """One method on one batch → float16 heatmaps [B, r, r] on the host."""
    entry = METHODS.get(name)
    params = dict(ctx.methods[name])
    if entry.meta.get("needs_layer"):
        params.setdefault("layer", ctx.layer)
    if entry.meta.get("stochastic"):
        params.setdefault("seed", ctx.cfg.run.seed)
    heat = entry.fn(ctx.model, x, target, **params).detach()
    if not torch.isfinite(heat).all():
        raise ValueError(f"{name} produced non-finite values")
    r = ctx.cfg.explain.resolution
    if heat.shape[-2:] != (r, r):
        # Area pooling keeps attribution mass where it was; bilinear when upsampling.
        mode = "area" if min(heat.shape[-2:]) >= r else "bilinear"
        heat = F.interpolate(heat[:, None].float(), size=(r, r), mode=mode)[:, 0].clamp_min(0)
    return heat.to(torch.float16).cpu().numpy()


def process_batch(ctx: Context, batch: Batch) -> Records:
    idx, x, sizes, hashes = batch.ids, batch.x, batch.sizes, batch.hashes
    rec = Records(skipped=[{"path": ctx.refs[i].rel, "reason": why} for i, why in batch.skipped])
    if x is None:
        return rec
    x = x.to(ctx.device, non_blocking=True)
    labels = torch.tensor([ctx.refs[i].label for i in idx])
    with torch.no_grad():
        logits = ctx.model(x).float()
    finite = torch.isfinite(logits).all(dim=1).cpu()
    if not finite.all():
        for j in torch.nonzero(~finite).flatten().tolist():
            rec.skipped.append({"path": ctx.refs[idx[j]].rel, "reason": "model output is NaN or inf"})
        keep = torch.nonzero(finite).flatten()
        idx, sizes, hashes = [idx[j] for j in keep], [sizes[j] for j in keep], [hashes[j] for j in keep]
        labels = labels[keep]
        x, logits = x[keep.to(x.device)], logits[keep.to(logits.device)]
        if not idx:
            return rec
    probs = logits.softmax(dim=1).cpu()
    conf, pred = probs.max(dim=1)
    chosen = select(ctx, idx, labels, pred, conf)
    for j, i in enumerate(idx):
        rec.rows.append({"id": i, "label": int(labels[j]), "prediction": int(pred[j]),
                         "confidence": float(conf[j]), "p_label": float(probs[j, labels[j]]),
                         "correct": bool(pred[j] == labels[j]), "explained": chosen[j],
                         "width": sizes[j][0], "height": sizes[j][1], "sha256": hashes[j]})
    sel = [j for j, c in enumerate(chosen) if c]
    wrong = [j for j in sel if pred[j] != labels[j]]
    for name in list(ctx.methods):
        if name in ctx.disabled or not sel:
            continue
        try:
            heat = explain(ctx, name, x[sel], pred[sel].to(ctx.device))
            rec.heatmaps.setdefault(name, {}).update({idx[j]: heat[k] for k, j in enumerate(sel)})
            if wrong:  # "why not the true class?" is a different question from "why P?"
                heat = explain(ctx, name, x[wrong], labels[wrong].to(ctx.device))
                rec.contrast.setdefault(name, {}).update({idx[j]: heat[k] for k, j in enumerate(wrong)})
        except Exception as e:  # one method failing must not stop the audit
            ctx.disabled[name] = f"{type(e).__name__}: {e}"
            rec.warnings.append(f"explanation method {name!r} failed and was skipped: {ctx.disabled[name]}")
    return rec


def merge(into: Records, part: Records) -> None:
    into.rows += part.rows
    into.skipped += part.skipped
    into.warnings += part.warnings
    for target, source in ((into.heatmaps, part.heatmaps), (into.contrast, part.contrast)):
        for name, maps in source.items():
            target.setdefault(name, {}).update(maps)


def run_local(ctx: Context, quiet: bool = False) -> Records:
    cfg = ctx.cfg
    total = Records(heatmaps={m: {} for m in ctx.methods}, contrast={m: {} for m in ctx.methods})
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=quiet, transient=True) as bar:
        task = bar.add_task("auditing images", total=len(ctx.refs))
        for batch in batches(ctx.refs, cfg.model.input, cfg.run.batch_size, cfg.run.workers):
            merge(total, process_batch(ctx, batch))
            bar.advance(task, len(batch.ids) + len(batch.skipped))
    return total
