"""The audit, start to finish: config → model and data → batches → rules → gate → outputs."""
from __future__ import annotations

import atexit
import hashlib
import inspect
import shutil
import tempfile
import platform
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import auditor.rules  # noqa: F401  (registers the rules)
import auditor.explain.methods  # noqa: F401  (registers the methods)
from auditor.inputs.config import AuditConfig, ConfigError, check_files, import_object
from auditor.inputs.data import discover, load_classes
from auditor.explain.engine import Context, run_local
from auditor.judge.intervene import confirm
from auditor.judge.trust import trust_gate
from auditor.judge.evidence import ClassFinding, Evidence, Finding, severity_rank
from auditor.inputs.model import build_model, file_sha256, pick_device, target_layer
from auditor.registry import METHODS, RULES, UnknownName
from auditor.judge import waivers
from auditor.judge.diff import load_baseline, provenance
from auditor.judge.gate import settle
from auditor.explain.store import LazyMaps, Store, digest

CACHE_VERSION = 1  # bump when a change makes cached predictions or heatmaps stale

# Used when the config names none: each costs one forward and backward pass, and between them
# they see coarse regions (a layer's view) and fine ones (the input's own pixels). On the demo
# they flag as many planted cues as adding occlusion, IG or SmoothGrad does, at a third of the time.
RECOMMENDED_METHODS = {"gradcam": {}, "saliency": {}}


@dataclass
class AuditResult:
    cfg: AuditConfig
    classes: list[str]
    evidence: Evidence
    findings: list[Finding]
    class_findings: list[ClassFinding]
    errors: list[dict]
    skipped: list[dict]
    warnings: list[str]
    metrics: dict
    run: dict
    gate: dict
    waived: dict = field(default_factory=dict)  # ("sample", id, rule) | ("class", cls, rule) -> waiver
    diff: dict | None = None                    # the comparison with report.baseline
    record: dict | None = None                  # diff.document(self), as the gate read it


def _check_names(cfg: AuditConfig, section: str, chosen: dict[str, dict], registry) -> None:
    """Unknown names and unknown params fail before any work, naming the key."""
    for name, params in chosen.items():
        try:
            entry = registry.get(name)
        except UnknownName as e:
            raise ConfigError(f"{cfg.source}: '{section}': {e}") from None
        sig = inspect.signature(entry.fn)
        allowed = [p for p in list(sig.parameters)[1 if section == "rules" else 3:]
                   if sig.parameters[p].kind == inspect.Parameter.KEYWORD_ONLY
                   or sig.parameters[p].default is not inspect.Parameter.empty]
        if any(p.kind == inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values()):
            continue
        for key in params:
            if key not in allowed:
                raise ConfigError(f"{cfg.source}: '{section}.{name}.{key}': unknown parameter; "
                                  f"allowed: {', '.join(allowed) or 'none'}")


def metrics_tables(y: np.ndarray, p: np.ndarray, classes: list[str]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Per-class precision, recall, support, and the confusion matrix (rows: true, columns: predicted)."""
    k = len(classes)
    confusion = np.zeros((k, k), int)
    np.add.at(confusion, (y, p), 1)
    tp = np.diag(confusion)
    predicted, support = confusion.sum(axis=0), confusion.sum(axis=1)
    per_class = pd.DataFrame({
        "class": classes,
        "precision": np.divide(tp, predicted, out=np.full(k, np.nan), where=predicted > 0),
        "recall": np.divide(tp, support, out=np.full(k, np.nan), where=support > 0),
        "support": support,
    })
    return per_class, pd.DataFrame(confusion, index=pd.Index(classes, name="true"),
                                   columns=pd.Index(classes, name="predicted"))


def versions() -> dict:
    import captum, PIL, skimage  # noqa: E401
    return {"python": platform.python_version(), "torch": torch.__version__, "captum": captum.__version__,
            "numpy": np.__version__, "pandas": pd.__version__, "scikit-image": skimage.__version__,
            "pillow": PIL.__version__, "auditor": _own_version()}


def _own_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("auditor")
    except PackageNotFoundError:
        return "unknown"


def open_store(cfg: AuditConfig) -> Store:
    """The cache named by ``run.cache``; with the cache off, a throwaway file (memory stays flat)."""
    if cfg.run.cache is False:
        folder = Path(tempfile.mkdtemp(prefix="auditor-"))
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        return Store(folder / "cache.sqlite")
    path = cfg.report.out / ".cache" / "cache.sqlite" if cfg.run.cache is True else Path(cfg.run.cache)
    return Store(path if path.is_absolute() else cfg.folder / path)


def cached_trust(ev: Evidence, methods: dict, layer, cfg: AuditConfig, store: Store, model_key: str) -> dict:
    """The trust gate, computed once per model, method settings and explained images."""
    explained = sorted(ev.samples.loc[ev.samples["explained"], "sha256"])
    key = digest("trust", model_key, methods, cfg.trust.model_dump(mode="json"), cfg.run.seed, explained)
    hit = store.get_json(key)
    if hit is not None:
        return hit
    trust = trust_gate(ev, methods, layer, cfg.trust, cfg.run.seed)
    store.put_json(key, trust)
    return trust


def cached_confirm(ev: Evidence, findings: list, class_findings: list, cfg: AuditConfig, store: Store,
                   model_key: str) -> None:
    """The interventions, run once per model, data, findings and intervention settings.

    A scheduled re-audit of an unchanged model on unchanged data finds the same suspicions;
    their tests (most of a rules pass's time) then come from the cache, outcome for outcome."""
    s = ev.samples
    every = [f.to_json() | {"image": s.at[f.sample, "sha256"]} for f in findings] + [f.to_json() for f in class_findings]
    key = digest("intervention", model_key, cfg.intervention.model_dump(mode="json"), cfg.run.seed,
                 sorted(zip(s["sha256"], s["label"].astype(int))), every)
    hit = store.get_json(key)
    if hit is not None:
        for f, (severity, message, details) in zip([*findings, *class_findings], hit):
            f.severity, f.message, f.details = severity, message, details
        return
    confirm(ev, findings, class_findings, cfg.intervention, cfg.run.seed)
    outcome = [(f.severity, f.message, f.details) for f in [*findings, *class_findings]]
    store.put_json(key, outcome, default=_plain)


def _plain(v):
    """numpy scalars and arrays in findings' details, as JSON."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


def run_audit(cfg: AuditConfig, quiet: bool = False) -> AuditResult:
    started = datetime.now(timezone.utc)
    if cfg.prepare:
        import_object(cfg.prepare, cfg.folder, "prepare", cfg.source)(cfg.folder)
    check_files(cfg)
    methods = cfg.explain.methods if cfg.explain.methods is not None else RECOMMENDED_METHODS
    # No rules named: every registered rule (each one stays quiet where it does not apply).
    rules = cfg.rules if cfg.rules is not None else {name: {} for name in RULES.names()}
    _check_names(cfg, "explain.methods", methods, METHODS)
    _check_names(cfg, "rules", rules, RULES)

    torch.manual_seed(cfg.run.seed)
    classes = load_classes(cfg)
    refs, warnings = discover(cfg, classes)
    warnings += waivers.check(cfg, classes, rules)
    baseline, notes = load_baseline(cfg, classes)
    warnings += notes
    device = pick_device(cfg.run.device)
    model = build_model(cfg, len(classes), device)
    layer = target_layer(model, cfg.model.target_layer, cfg.source)
    if layer is None:
        needs = [m for m in methods if METHODS.get(m).meta.get("needs_layer")]
        if needs:
            warnings.append(f"the model has no Conv2d, so {', '.join(needs)} cannot run; set model.target_layer")
            methods = {m: p for m, p in methods.items() if m not in needs}
    support = pd.Series([r.label for r in refs]).value_counts().to_dict()

    weights_sha = file_sha256(cfg.model.weights) if cfg.model.weights else None
    model_key = digest(CACHE_VERSION, weights_sha, cfg.model.factory, cfg.model.kwargs,
                       cfg.model.input.model_dump(mode="json"))
    store = open_store(cfg)
    ctx = Context(cfg, model, device, layer, methods, support, refs, model_key)
    t0 = time.perf_counter()
    if cfg.run.engine == "ray":
        from auditor.explain.ray_engine import run_ray
        rec = run_ray(ctx, store, quiet=quiet)
    else:
        rec = run_local(ctx, store, quiet=quiet)
    seconds = time.perf_counter() - t0
    warnings += rec.warnings
    if store.corrupt:
        warnings.append(f"{store.corrupt} corrupted cache entries were detected and recomputed")
    if not rec.rows:
        raise ConfigError(f"{cfg.data.root or cfg.data.manifest}: none of the {len(refs)} images could be decoded")

    samples = pd.DataFrame(rec.rows).set_index("id").sort_index()
    samples.insert(0, "path", [refs[i].rel for i in samples.index])
    used = [m for m in methods if m not in ctx.disabled]
    ev = Evidence(classes, samples, {m: LazyMaps(store, rec.heatmaps.get(m, {})) for m in used},
                  {m: LazyMaps(store, rec.contrast.get(m, {})) for m in used}, refs,
                  model=model, input_spec=cfg.model.input, device=device)

    trust = cached_trust(ev, {m: methods[m] for m in used}, layer, cfg, store, model_key) if cfg.trust.enabled else {}
    ev.reliable = {m: t["reliable"] for m, t in trust.items()}
    for m, t in trust.items():
        if not t["reliable"]:
            warnings.append(f"explanation method {m!r} failed the trust gate and was not used by the rules: {t['reason']}")
    if ev.heatmaps and not ev.methods:
        warnings.append("no explanation method passed the trust gate: the rules had no evidence to work with")

    findings, class_findings, errors = [], [], []
    for name, params in rules.items():
        try:
            for f in RULES.get(name).fn(ev, **params):
                (findings if isinstance(f, Finding) else class_findings).append(f)
        except Exception as e:  # a broken rule is reported, the audit goes on
            errors.append({"rule": name, "error": f"{type(e).__name__}: {e}"})
            warnings.append(f"rule {name!r} failed: {type(e).__name__}: {e}")
    cached_confirm(ev, findings, class_findings, cfg, store, model_key)
    order = lambda f: (-severity_rank(f.severity), -f.score)  # noqa: E731
    findings.sort(key=order)
    class_findings.sort(key=order)

    y, p = samples["label"].to_numpy(), samples["prediction"].to_numpy()
    per_class, confusion = metrics_tables(y, p, classes)
    metrics = {"accuracy": float((y == p).mean()), "images": int(len(samples)),
               "misclassified": int((y != p).sum()), "explained": int(samples["explained"].sum()),
               "per_class": per_class, "confusion": confusion}

    fingerprint = hashlib.sha256("".join(f"{r}\t{h}\n" for r, h in sorted(zip(samples["path"], samples["sha256"])))
                                 .encode()).hexdigest()
    run = {"started": started.isoformat(timespec="seconds"), "seconds_in_batches": round(seconds, 2),
           "config": cfg.model_dump(mode="json"), "config_file": str(cfg.source),
           "weights_sha256": weights_sha, "computed": rec.computed,
           "data_fingerprint": fingerprint, "versions": versions(), "device": str(device),
           "seed": cfg.run.seed, "methods": methods, "rules": rules,
           "methods_disabled": dict(ctx.disabled), "trust": trust, "argv": sys.argv[1:]}
    run.update(provenance(cfg))
    res = AuditResult(cfg, classes, ev, findings, class_findings, errors, rec.skipped, warnings, metrics, run, {})
    settle(res, baseline)  # waivers, the comparison with the baseline, the gate
    return res
