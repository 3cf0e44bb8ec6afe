"""The audit's heavy step, one batch at a time: decode → predict → explain → store small records.

``process_batch`` depends only on (context, batch), so an engine that runs it elsewhere (a
worker pool, a cluster) gives the same records. Results are content-addressed in the
``Store``: whatever is already there (an earlier run, an interrupted one) is not recomputed,
and heatmaps leave memory as soon as they are written.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from auditor.inputs.config import AuditConfig, describe_exception
from auditor.inputs.data import Batch, DataError, SampleRef, batches
from auditor.registry import METHODS
from auditor.explain.store import Store, digest


@dataclass
class Context:
    cfg: AuditConfig
    model: torch.nn.Module
    device: torch.device
    layer: torch.nn.Module | None
    methods: dict[str, dict]             # name -> params, as configured
    support: dict[int, int]              # images per true class, for the per-class sample
    refs: list[SampleRef]
    model_key: str                       # hash of weights and model settings: part of every cache key
    disabled: dict[str, str] = field(default_factory=dict)   # method -> why it stopped


@dataclass
class Records:
    rows: list[dict] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    heatmaps: dict[str, dict[int, str]] = field(default_factory=dict)   # method -> sample id -> store key
    contrast: dict[str, dict[int, str]] = field(default_factory=dict)
    computed: dict[str, int] = field(default_factory=dict)               # what was not found in the store


def _uniform(rel: str, seed: int) -> float:
    """A stable pseudo-random number in [0, 1) per image: selection independent of batch order."""
    h = hashlib.blake2b(f"{seed}:{rel}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "big") / 2**64


def select(ctx: Context, idx: list[int], labels: np.ndarray, pred: np.ndarray, conf: np.ndarray) -> list[bool]:
    spec = ctx.cfg.explain
    out = []
    for j, i in enumerate(idx):
        wrong = pred[j] != labels[j]
        if spec.samples == "all" or wrong or (spec.samples == "low_confidence" and conf[j] < spec.threshold):
            out.append(True)
            continue
        # A seeded sample of correct images per class, for class-level comparisons.
        share = spec.per_class / max(ctx.support.get(int(labels[j]), 1), 1)
        out.append(_uniform(ctx.refs[i].rel, ctx.cfg.run.seed) < share)
    return out


# Activation memory of one row through a typical CNN with gradients, as a multiple of the input's
# own bytes (a ResNet-18 at 224 px needs ~24 MB a row: ~40x its 0.6 MB input).
ROW_MEMORY_FACTOR = 40


def max_rows(ctx: Context) -> int:
    """Rows per model call inside a method, from the memory budget ``run.max_memory`` (MB)."""
    c, (h, w) = ctx.cfg.model.input.channels, ctx.cfg.model.input.size
    return max(1, int(ctx.cfg.run.max_memory * 2**20 // (ROW_MEMORY_FACTOR * c * h * w * 4)))


def method_kwargs(name: str, params: dict, layer, seed: int, rows: int | None = None) -> dict:
    """A method's configured params plus what the run supplies: its layer, seed and row budget."""
    entry = METHODS.get(name)
    out = dict(params)
    if entry.meta.get("needs_layer"):
        out["layer"] = layer
    if entry.meta.get("stochastic"):
        out.setdefault("seed", seed)
    if rows is not None and "max_rows" in entry.meta.get("defaults", {}):
        out.setdefault("max_rows", rows)
    return out


def method_params(ctx: Context, name: str) -> dict:
    return method_kwargs(name, ctx.methods[name], ctx.layer, ctx.cfg.run.seed, max_rows(ctx))


def is_oom(e: Exception) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


def split_on_oom(run, items, join, device: torch.device | None = None):
    """``run(items)``; a batch that runs out of memory (a small GPU) is split in half and retried,
    the halves' results put together by ``join``."""
    try:
        return run(items)
    except (RuntimeError, MemoryError) as e:
        if not is_oom(e) or len(items) == 1:
            raise
        if device is not None and device.type == "cuda":
            torch.cuda.empty_cache()
        half = len(items) // 2
        return join([split_on_oom(run, items[:half], join, device), split_on_oom(run, items[half:], join, device)])


def attribute(ctx: Context, name: str, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Run a method; a batch that runs out of memory is split in half and retried."""
    fn, params = METHODS.get(name).fn, method_params(ctx, name)
    return split_on_oom(lambda r: fn(ctx.model, x[r.start:r.stop], target[r.start:r.stop], **params).detach(),
                        range(len(x)), torch.cat, ctx.device)


def resize(heat: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, h, w] heatmaps at ``size``: area pooling down (attribution mass stays where it was),
    bilinear up; unchanged when already that size."""
    if tuple(heat.shape[-2:]) == tuple(size):
        return heat
    mode = "area" if min(heat.shape[-2:]) >= min(size) else "bilinear"
    return F.interpolate(heat[:, None].float(), size=tuple(size), mode=mode)[:, 0].clamp_min(0)


def explain(ctx: Context, name: str, x: torch.Tensor, target: torch.Tensor) -> np.ndarray:
    """One method on one batch → float16 heatmaps [B, r, r] on the host."""
    heat = attribute(ctx, name, x, target)
    if not torch.isfinite(heat).all():
        raise ValueError(f"{name} produced non-finite values")
    r = ctx.cfg.explain.resolution
    return resize(heat, (r, r)).to(torch.float16).cpu().numpy()


def map_key(ctx: Context, image_sha: str, method: str, target: int) -> str:
    # A method that reads a layer gets another map for another layer (model.target_layer).
    layer = ctx.cfg.model.target_layer if METHODS.get(method).meta.get("needs_layer") else None
    return digest("map", ctx.model_key, image_sha, method, ctx.methods[method], target,
                  ctx.cfg.explain.resolution, ctx.cfg.run.seed, *([layer] if layer else []))


def _softmax(row: np.ndarray) -> np.ndarray:
    return torch.from_numpy(row).softmax(dim=0).numpy()


def predict(ctx: Context, x: torch.Tensor, rows: list[int]) -> tuple[list[np.ndarray | None], dict[int, str]]:
    """Logits (float32, host) of ``x[rows]``; a batch whose forward raises is retried image by image,
    so only the images the model fails on are lost, each with the exception as its reason."""
    try:
        with torch.no_grad():
            out = ctx.model(x[rows]).float()
        if out.shape[0] != len(rows):
            raise ValueError(f"the model returned {out.shape[0]} rows for {len(rows)} images")
        return list(out.cpu().numpy()), {}
    except Exception as e:  # noqa: BLE001
        if len(rows) == 1:
            return [None], {rows[0]: describe_exception(e)}
    logits, failed = [], {}
    for j in rows:
        (row,), why = predict(ctx, x, [j])
        logits.append(row)
        failed.update(why)
    return logits, failed


def process_batch(ctx: Context, batch: Batch, store: Store) -> Records:
    rec = Records(skipped=[{"path": ctx.refs[i].rel, "reason": why} for i, why in batch.skipped])
    if batch.x is None:
        return rec
    idx, hashes = batch.ids, batch.hashes
    new: dict[str, np.ndarray] = {}

    # Predict what the store does not already know.
    prob_keys = [digest("probs", ctx.model_key, h) for h in hashes]
    known = store.get_many(prob_keys)
    todo = [j for j, k in enumerate(prob_keys) if k not in known]
    x = batch.x.to(ctx.device, non_blocking=True)
    failed: dict[int, str] = {}
    if todo:
        logits, failed = predict(ctx, x, todo)
        for j, row in zip(todo, logits):
            if row is not None and np.isfinite(row).all():
                known[prob_keys[j]] = new[prob_keys[j]] = _softmax(row)
        rec.computed["predictions"] = len(todo)
    keep = [j for j, k in enumerate(prob_keys) if k in known]
    for j in sorted(set(range(len(idx))) - set(keep)):
        why = f"the model failed on this image: {failed[j]}" if j in failed else "model output is NaN or inf"
        rec.skipped.append({"path": ctx.refs[idx[j]].rel, "reason": why})
    if not keep:
        return rec

    probs = np.stack([known[prob_keys[j]] for j in keep])
    labels = np.array([ctx.refs[idx[j]].label for j in keep])
    pred, conf = probs.argmax(1), probs.max(1)
    chosen = select(ctx, [idx[j] for j in keep], labels, pred, conf)
    for k, j in enumerate(keep):
        w, h = batch.sizes[j]
        rec.rows.append({"id": idx[j], "label": int(labels[k]), "prediction": int(pred[k]),
                         "confidence": float(conf[k]), "p_label": float(probs[k, labels[k]]),
                         "correct": bool(pred[k] == labels[k]), "explained": chosen[k],
                         "width": w, "height": h, "sha256": hashes[j]})

    # Explain the chosen images: why the prediction, and for errors also why (not) the true class.
    jobs = [(k, "pred", int(pred[k])) for k in range(len(keep)) if chosen[k]]
    jobs += [(k, "true", int(labels[k])) for k in range(len(keep)) if chosen[k] and pred[k] != labels[k]]
    for name in ctx.methods:
        if name in ctx.disabled or not jobs:
            continue
        keys = [map_key(ctx, hashes[keep[k]], name, t) for k, _, t in jobs]
        have = store.has_many(keys)
        missing = [n for n, key in enumerate(keys) if key not in have]
        try:
            if missing:
                rows = torch.tensor([keep[jobs[n][0]] for n in missing], device=x.device)
                target = torch.tensor([jobs[n][2] for n in missing], device=x.device)
                heat = explain(ctx, name, x[rows], target)
                new.update({keys[n]: heat[m] for m, n in enumerate(missing)})
                rec.computed[name] = rec.computed.get(name, 0) + len(missing)
        except Exception as e:  # one method failing must not stop the audit
            ctx.disabled[name] = f"{type(e).__name__}: {e}"
            rec.warnings.append(f"explanation method {name!r} failed and was skipped: {ctx.disabled[name]}")
            continue
        for (k, kind, _), key in zip(jobs, keys):
            (rec.heatmaps if kind == "pred" else rec.contrast).setdefault(name, {})[idx[keep[k]]] = key
    store.put_many(new)  # one transaction per batch: a killed run resumes from here
    return rec


def merge(into: Records, part: Records) -> None:
    into.rows += part.rows
    into.skipped += part.skipped
    into.warnings += part.warnings
    for target, source in ((into.heatmaps, part.heatmaps), (into.contrast, part.contrast)):
        for name, keys in source.items():
            target.setdefault(name, {}).update(keys)
    for k, v in part.computed.items():
        into.computed[k] = into.computed.get(k, 0) + v


def run_local(ctx: Context, store: Store, quiet: bool = False) -> Records:
    cfg = ctx.cfg
    total = Records(heatmaps={m: {} for m in ctx.methods}, contrast={m: {} for m in ctx.methods})
    columns = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    if getattr(store, "notice", None):
        total.warnings.append(store.notice)
    with Progress(*columns, disable=quiet, transient=True) as bar:
        task = bar.add_task("auditing images", total=len(ctx.refs))
        for batch in batches(ctx.refs, cfg.model.input, cfg.run.batch_size, cfg.run.workers,
                             pin=ctx.device.type == "cuda", min_size=cfg.data.min_size):
            merge(total, process_batch(ctx, batch, store))
            bar.advance(task, len(batch.ids) + len(batch.skipped))
    check_usable(ctx, total)
    return total


def check_usable(ctx: Context, rec: Records) -> None:
    """No image gave a prediction: a one-line DataError saying why (the commonest reasons, counted)."""
    if rec.rows:
        return
    where = ctx.cfg.data.root or ctx.cfg.data.manifest
    reasons: dict[str, list[str]] = {}
    for s in rec.skipped:
        reasons.setdefault(s["reason"], []).append(s["path"])
    common = sorted(reasons.items(), key=lambda kv: -len(kv[1]))[:2]
    short = lambda r: r if len(r) <= 160 else r[:159] + "…"  # noqa: E731
    why = "; ".join(f"{len(paths)} × {short(reason)} (e.g. {paths[0]})" for reason, paths in common)
    if len(reasons) > 2:
        why += f"; and {len(rec.skipped) - sum(len(p) for _, p in common)} more for other reasons"
    raise DataError(f"{where}: none of the {len(ctx.refs)} images could be audited: {why or 'no results'}")
