"""The audit, start to finish: config → model and data → batches (decode, predict, explain) →
trust gate → rules → intervention → the run's record → waivers, comparison, gate.

Writing the run folder from the record is ``auditor.outputs.write``.
"""
from __future__ import annotations

import atexit
import datetime as dt
import hashlib
import json
import platform
import shutil
import sys
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import auditor.explain.methods  # noqa: F401  (registers the methods)
import auditor.rules  # noqa: F401  (registers the rules)
from auditor.explain.engine import Context, run_local
from auditor.explain.layers import default_layer, describe_layer
from auditor.explain.store import LazyMaps, Store, digest
from auditor.inputs.config import AuditConfig, ConfigError, check_files, import_object
from auditor.inputs.data import discover, load_classes
from auditor.inputs.model import build_model, file_sha256, pick_device, target_layer
from auditor.judge import waivers
from auditor.judge.diff import compare, load_baseline, provenance
from auditor.judge.evidence import ClassFinding, Evidence, Finding, severity_rank
from auditor.judge.gate import evaluate
from auditor.judge.intervene import confirm
from auditor.judge.trust import trust_gate
from auditor.record import Check, Coverage, RunRecord, Views
from auditor.registry import METHODS, RULES, BadParams, UnknownName
from auditor.views import global_views

CACHE_VERSION = 5  # (5: a class finding is confirmed only beyond its class's own content moved to its place) bump when a change makes cached predictions, heatmaps, trust verdicts or intervention outcomes stale

# Used when the config names none: each costs one forward and backward pass, and between them
# they see coarse regions (a layer's view) and fine ones (the input's own pixels). On the demo
# they flag as many planted cues as adding occlusion, IG or SmoothGrad does, at a third of the time.
RECOMMENDED_METHODS = {"gradcam": {}, "saliency": {}}


@dataclass(frozen=True)
class AuditResult:
    """The run's record, and what its pictures are drawn from (the evidence; the rules' findings
    as objects, for tests and benchmarks). Renderings read only ``record`` and the pictures."""
    cfg: AuditConfig
    record: RunRecord
    evidence: Evidence
    findings: list[Finding]
    class_findings: list[ClassFinding]


def checked_params(cfg: AuditConfig, section: str, chosen: dict[str, dict], registry) -> dict[str, dict]:
    """Names and params checked against the registry before any work: an unknown name, an
    unknown param, a wrong type or a value out of range is a one-line error naming the key."""
    out = {}
    for name, params in chosen.items():
        try:
            out[name] = registry.get(name).validate(params)
        except UnknownName as e:
            raise ConfigError(f"{cfg.source}: '{section}': {e}") from None
        except BadParams as e:
            raise ConfigError(f"{cfg.source}: '{section}.{name}.{e.key}': {e.why}") from None
    return out


def model_digest(model: torch.nn.Module) -> str:
    """sha256 of the built model's state (every parameter and buffer, after loading), so the
    cache and the record follow the weights that run, wherever they were loaded from."""
    h = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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


def cached_trust(ev: Evidence, methods: dict, layer, cfg: AuditConfig, store: Store, model_key: str,
                 layer_info: dict | None = None) -> dict:
    """The trust gate, computed once per model, layer, method settings and explained images; a
    method that could not be tested (say, out of memory) is not cached, so a rerun tries again."""
    explained = sorted(ev.samples.loc[ev.samples["explained"], "sha256"])
    # The gate reuses the engine's maps of its test images: their resolution counts too.
    key = digest("trust", model_key, methods, cfg.trust.model_dump(mode="json"), cfg.run.seed, explained,
                 (layer_info or {}).get("name"), cfg.explain.resolution)
    hit = store.get_json(key)
    if hit is not None:
        return hit
    trust = trust_gate(ev, methods, layer, cfg.trust, cfg.run.seed)
    if not any(t.get("untestable") for t in trust.values()):
        store.put_json(key, trust)
    return trust


def cached_confirm(ev: Evidence, findings: list, class_findings: list, cfg: AuditConfig, store: Store,
                   model_key: str) -> None:
    """The interventions, run once per model, data, findings and intervention settings.

    A scheduled re-audit of an unchanged model on unchanged data finds the same suspicions;
    their tests (most of a rules pass's time) then come from the cache, outcome for outcome."""
    s = ev.samples
    every = [f.to_json() | {"image": s.at[f.sample, "sha256"]} for f in findings] + [f.to_json() for f in class_findings]
    # Restore donors are ranked by the explained images' heatmaps: what was explained, and how, counts too.
    # (3: the outcome holds the confirmed class cues' instances and absences too, and what they fold in;
    # 4: isolated findings; 5: a class finding with no placebo beside it is low)
    key = digest("intervention", 5, model_key, cfg.intervention.model_dump(mode="json"), cfg.run.seed,
                 sorted(zip(s["sha256"], s["label"].astype(int))), every,
                 sorted(s.loc[s["explained"], "sha256"]), cfg.explain.model_dump(mode="json"),
                 cfg.model.target_layer)
    hit = store.get_json(key)
    if hit is not None:
        for f, (severity, message, details) in zip([*findings, *class_findings], hit["outcome"]):
            f.severity, f.message, f.details = severity, message, details
            if isinstance(f, Finding) and (details.get("intervention") or {}).get("bbox"):
                f.bbox = details["intervention"]["bbox"]  # the box the intervention refined
        findings[:] = [f for f in findings if not f.details.get("superseded_by")]  # folded into an absence
        findings.extend(Finding(sample=i, **d) for i, d in hit["instances"])
        return
    tested = [*findings, *class_findings]
    added = confirm(ev, findings, class_findings, cfg.intervention, cfg.run.seed)
    store.put_json(key, {"outcome": [(f.severity, f.message, f.details) for f in tested],
                         "instances": [(int(f.sample), f.to_json()) for f in added]}, default=_plain)


def _plain(v):
    """numpy scalars and arrays in findings' details, as JSON."""
    return v.tolist() if hasattr(v, "tolist") else str(v)


@contextmanager
def phase(what: str, quiet: bool):
    """A spinner on stderr while a phase that can take a while runs (nothing when quiet)."""
    if quiet:
        yield
        return
    from rich.console import Console
    with Console(stderr=True).status(what):
        yield


def run_rules(ev: Evidence, rules: dict[str, dict], required: bool) -> tuple[list, list, list, dict[str, Check]]:
    """Every rule that applies, with its coverage; a rule that raises is recorded, the audit goes on."""
    findings, class_findings, errors, coverage = [], [], [], {}
    masks = sum(r.mask is not None or r.bbox is not None for r in ev.refs)
    with_maps = len(set().union(*(ev.heatmaps[m] for m in ev.methods))) if ev.methods else 0
    for name, params in rules.items():
        needs = RULES.get(name).needs
        if "masks" in needs and not masks:
            coverage[name] = Check(state="not_applicable", reason="needs masks or boxes in the manifest",
                                   required=required)
            continue
        if "heatmaps" in needs and not with_maps:
            why = ("no image was chosen to be explained" if ev.methods else
                   "every explanation method it reads failed or was not trusted" if ev.heatmaps else
                   "no explanation method ran")
            coverage[name] = Check(state="no_evidence", reason=why, required=required)
            continue
        try:
            for f in RULES.get(name).fn(ev, **params):
                (findings if isinstance(f, Finding) else class_findings).append(f)
        except Exception as e:  # a broken rule is reported, the audit goes on
            error = f"{type(e).__name__}: {e}".splitlines()[0]
            errors.append({"rule": name, "error": error})
            coverage[name] = Check(state="error", reason=error, required=required)
            continue
        coverage[name] = Check(state="ran", examined=with_maps if "heatmaps" in needs else len(ev.samples),
                               required=required)
    return findings, class_findings, errors, coverage


def method_coverage(methods: dict, inapplicable: dict[str, str], disabled: dict[str, str], trust: dict,
                    ev: Evidence, required: bool) -> dict[str, Check]:
    out = {}
    # The configured methods, then a fallback the audit ran because none of them passed the trust gate.
    for m in [*methods, *(k for k, t in trust.items() if t.get("fallback") and k not in methods)]:
        t = trust.get(m) or {}
        if t.get("fallback"):
            out[m] = (Check(state="ran", examined=len(ev.heatmaps.get(m, {})), reason=t["note"]) if t["reliable"]
                      else Check(state="error", reason=t["reason"]))
        elif m in inapplicable:
            out[m] = Check(state="not_applicable", reason=inapplicable[m], required=required)
        elif m in disabled:
            out[m] = Check(state="error", reason=disabled[m].splitlines()[0], required=required)
        elif t.get("untestable"):
            out[m] = Check(state="error", reason=t["reason"], required=required)
        elif t and not t["reliable"]:
            out[m] = Check(state="unreliable", examined=len(ev.heatmaps.get(m, {})),
                           reason=f"failed the trust gate: {t['reason']}", required=required)
        elif not ev.heatmaps.get(m):
            out[m] = Check(state="no_evidence", reason="no image was chosen to be explained", required=required)
        else:
            out[m] = Check(state="ran", examined=len(ev.heatmaps[m]), reason=t.get("note", ""), required=required)
    return out


def run_audit(cfg: AuditConfig, quiet: bool = False) -> AuditResult:
    started = datetime.now(timezone.utc)
    if cfg.prepare:
        with phase("preparing (the first run of the demo generates its images and trains its model)", quiet):
            import_object(cfg.prepare, cfg.folder, "prepare", cfg.source)(cfg.folder)
    check_files(cfg)
    methods = checked_params(cfg, "explain.methods", cfg.explain.methods if cfg.explain.methods is not None
                             else RECOMMENDED_METHODS, METHODS)
    # No rules named: every registered rule (each is recorded as not applicable where it does not apply).
    rules = checked_params(cfg, "rules", cfg.rules if cfg.rules is not None else {n: {} for n in RULES.names()},
                           RULES)

    torch.manual_seed(cfg.run.seed)
    classes = load_classes(cfg)
    refs, warnings = discover(cfg, classes)
    warnings += waivers.check(cfg, classes, rules)
    baseline, notes = load_baseline(cfg, classes)
    warnings += notes
    device = pick_device(cfg.run.device)
    model = build_model(cfg, len(classes), device)
    layer = (target_layer(model, cfg.model.target_layer, cfg.source) if cfg.model.target_layer
             else default_layer(model, (cfg.model.input.channels, *cfg.model.input.size), device))
    layer_info = describe_layer(model, layer, cfg.model.target_layer, (cfg.model.input.channels, *cfg.model.input.size))
    inapplicable = {m: "no layer of the model gives a spatial feature map to explain; set model.target_layer"
                    for m in methods if layer is None and "layer" in METHODS.get(m).needs}
    inapplicable |= {m: why for m in methods if m not in inapplicable
                     and (why := (METHODS.get(m).meta.get("not_applicable") or (lambda _: None))(model))}
    warnings += [model.note] if getattr(model, "note", "") else []
    support = pd.Series([r.label for r in refs]).value_counts().to_dict()

    weights_sha = file_sha256(cfg.model.weights) if cfg.model.weights else None
    state_sha = model_digest(model)
    # The weights that run, and what else shapes the forward pass: the factory's kwargs, an HF config.
    hf_config = cfg.model.huggingface_folder and cfg.model.huggingface_folder / "config.json"
    model_key = digest(CACHE_VERSION, state_sha, cfg.model.factory, cfg.model.kwargs,
                       file_sha256(hf_config) if hf_config and hf_config.is_file() else None,
                       cfg.model.input.model_dump(mode="json"), cfg.model.output, cfg.model.reshape)
    store = open_store(cfg)
    ctx = Context(cfg, model, device, layer, {m: p for m, p in methods.items() if m not in inapplicable},
                  support, refs, model_key)
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
    if not rec.rows:  # (the engine says why no image could be audited before it gets here)
        raise ConfigError(f"{cfg.data.root or cfg.data.manifest}: none of the {len(refs)} images could be audited")

    samples = pd.DataFrame(rec.rows).set_index("id").sort_index()
    samples.insert(0, "path", [refs[i].rel for i in samples.index])
    used = [m for m in ctx.methods if m not in ctx.disabled]
    ev = Evidence(classes, samples, {m: LazyMaps(store, rec.heatmaps.get(m, {})) for m in used},
                  {m: LazyMaps(store, rec.contrast.get(m, {})) for m in used}, refs,
                  model=model, input_spec=cfg.model.input, device=device, layer=layer)

    with phase("testing the explanation methods (trust gate)", quiet):
        trust = (cached_trust(ev, {m: methods[m] for m in used}, layer, cfg, store, model_key, layer_info)
                 if cfg.trust.enabled else {})
    ev.reliable = {m: t["reliable"] for m, t in trust.items()}
    for m, t in trust.items():
        if not t["reliable"]:
            warnings.append(f"explanation method {m!r} failed the trust gate and was not used by the rules: {t['reason']}")
        elif t.get("note"):
            warnings.append(f"explanation method {m!r} was kept, a trust test being inconclusive: {t['note']}")
    backup = cfg.trust.fallback
    if trust and ev.heatmaps and not ev.methods and backup and backup not in ctx.methods:
        # Every method failed on evidence: the rules read a model-only method rather than nothing.
        from auditor.judge.trust import fallback_maps
        with phase(f"no method passed the trust gate: explaining the images with {backup}", quiet):
            fb = trust[backup] = fallback_maps(ctx, ev, store, backup, quiet)
        warnings.append(f"no explanation method passed the trust gate: the rules read {backup}'s heatmaps instead "
                        f"(a model-only method) on {fb['images']} explained images" if fb["reliable"] else
                        f"no explanation method passed the trust gate, and the fallback {backup!r} {fb['reason']}")
    if ev.heatmaps and not ev.methods:
        warnings.append("no explanation method passed the trust gate: the rules had no evidence to work with")

    with phase("running the checks", quiet):
        findings, class_findings, errors, rule_checks = run_rules(ev, rules, required=cfg.rules is not None)
    for e in errors:
        warnings.append(f"rule {e['rule']!r} failed: {e['error']}")
    with phase(f"testing {len(findings) + len(class_findings)} findings by intervention", quiet):
        cached_confirm(ev, findings, class_findings, cfg, store, model_key)
    with phase("drawing how the model sees each class", quiet):
        views = global_views(ev, findings, class_findings, cfg)
    if views.state == "error":  # the section is a view, not a check: said, not gated
        warnings.append(f"the global views (how the model sees each class) could not be drawn: {views.reason}")
    order = lambda f: (-severity_rank(f.severity), -f.score)  # noqa: E731
    findings.sort(key=order)
    class_findings.sort(key=order)
    coverage = Coverage(
        methods=method_coverage(methods, inapplicable, ctx.disabled, trust, ev, cfg.explain.methods is not None),
        rules=rule_checks,
        trust=Check(state="ran", examined=max((t.get("images", 0) for t in trust.values()), default=0))
        if cfg.trust.enabled else Check(state="off", reason="trust.enabled is false: methods were used untested"),
        intervention=Check(state="ran", examined=sum("intervention" in f.details for f in [*findings, *class_findings]))
        if cfg.intervention.enabled else Check(state="off", reason="intervention.enabled is false"))

    run = {"started": started.isoformat(timespec="seconds"), "seconds_in_batches": round(seconds, 2),
           "config": cfg.model_dump(mode="json"), "config_file": str(cfg.source), "classes": classes,
           "weights_sha256": weights_sha, "model_sha256": state_sha, "computed": rec.computed,
           "data_fingerprint": fingerprint(samples), "versions": versions(), "device": str(device),
           "seed": cfg.run.seed, "methods": methods, "rules": rules, "layer": layer_info,
           "methods_disabled": dict(ctx.disabled) | inapplicable, "trust": trust, "argv": sys.argv[1:],
           **provenance(cfg)}
    record = build_record(run, coverage, ev, findings, class_findings, errors, rec.skipped, warnings, views)
    record = settle(record, cfg, baseline)
    return AuditResult(cfg, record, ev, findings, class_findings)


def fingerprint(samples: pd.DataFrame) -> str:
    """sha256 over the sorted relative paths and file hashes of the audited images."""
    return hashlib.sha256("".join(f"{r}\t{h}\n" for r, h in sorted(zip(samples["path"], samples["sha256"])))
                          .encode()).hexdigest()


def build_record(run: dict, coverage: Coverage, ev: Evidence, findings: list[Finding],
                 class_findings: list[ClassFinding], errors: list, skipped: list, warnings: list,
                 views: Views | None = None) -> RunRecord:
    """The run's record, from the evidence and the (confirmed) findings; no gate yet."""
    classes, s = ev.classes, ev.samples
    y, p = s["label"].to_numpy(), s["prediction"].to_numpy()
    per_class, confusion = metrics_tables(y, p, classes)
    mine: dict[int, list] = {}
    for f in findings:
        mine.setdefault(f.sample, []).append(f.to_json())
    cols = ["path", "label", "prediction", "confidence", "correct", "explained", "sha256", "width", "height"]
    samples = [{"id": int(i), "path": r["path"], "label": classes[r["label"]], "prediction": classes[r["prediction"]],
                "confidence": round(float(r["confidence"]), 6), "correct": bool(r["correct"]),
                "explained": bool(r["explained"]), "sha256": r["sha256"], "size": [int(r["width"]), int(r["height"])],
                "findings": mine.get(int(i), [])}
               for i, r in zip(s.index, s[cols].to_dict("records"))]
    doc = {"run": run, "coverage": coverage.model_dump(mode="json"),
           "metrics": {"accuracy": round(float((y == p).mean()), 6), "images": int(len(s)),
                       "misclassified": int((y != p).sum()), "explained": int(s["explained"].sum()),
                       "per_class": json.loads(per_class.round(6).to_json(orient="records")),
                       "confusion": {"classes": classes, "matrix": confusion.to_numpy().tolist()}},
           "samples": samples, "class_findings": [f.to_json() for f in class_findings],
           "skipped": skipped, "warnings": warnings, "errors": errors,
           "views": None if views is None else views.model_dump(mode="json")}
    # Through JSON once: numpy scalars in details become plain numbers, as findings.json holds them.
    return RunRecord.model_validate(json.loads(json.dumps(doc, default=_plain)))


def settle(record: RunRecord, cfg: AuditConfig, baseline: tuple[RunRecord, object] | None) -> RunRecord:
    """Waivers, the comparison with the baseline and the gate: each a pure function of records."""
    today = dt.date.fromisoformat(record.run["started"][:10])
    record, notes = waivers.apply(cfg.waivers, record, today)
    diff = compare(baseline[0], baseline[1], record, cfg.run.seed) if baseline else None
    gate = evaluate(cfg.report.fail_on, record, diff)
    notes += [f"report.fail_on.{c['name']} was not checked: there is no baseline to compare with"
              for c in gate.conditions if c["skipped"]]
    changes = None if diff is None else {"baseline_run": diff["baseline_run"], **diff["counts"]}
    return record.model_copy(update={"gate": gate, "diff": diff, "changes": changes,
                                     "warnings": [*record.warnings, *notes]})
