"""The run's record: one typed, immutable account of an audit, built once after intervention.

Its JSON form is findings.json (``schema_version`` 2; version 1 files still load, upgraded on
reading). The waivers, the comparison with a baseline and the gate are pure functions of records
(``auditor.judge``); every rendering (findings.json, samples.csv, the report, JUnit) reads only a
record and the run's pictures, so a run folder can be rendered again without the model.

Coverage says, for every method and rule, whether it ran and on what: a check that could not run
is never read as one that found nothing.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from auditor.inputs.config import SEVERITIES, ConfigError, Severity

SCHEMA_VERSION = 2
READABLE_SCHEMAS = (1, 2)

# ran: it examined ``examined`` images (or classes); not_applicable: what it needs is not there
# (masks, a layer); no_evidence: every method it reads was unreliable or failed, or nothing was
# explained; unreliable: a method that ran but failed the trust gate; error: it raised; off:
# switched off in the config.
CheckState = Literal["ran", "not_applicable", "no_evidence", "unreliable", "error", "off"]
STATE_WORDS = {"ran": "ran", "not_applicable": "not run", "no_evidence": "no evidence",
               "unreliable": "not trusted", "error": "could not run", "off": "switched off"}
Verdict = Literal["PASS", "FAIL", "INCOMPLETE"]


class Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore", populate_by_name=True, serialize_by_alias=True)


class Waived(Frozen):
    waiver: int
    owner: str
    reason: str
    expires: str


class Suspicion(Frozen):
    """What an image finding and a class finding share: the rule's numbers and words, the
    intervention's outcome (in ``details``), and a waiver if one covers it."""
    rule: str
    method: str | None = None
    severity: Severity
    score: float
    message: str
    details: dict[str, Any] = {}
    waived: Waived | None = None

    @property
    def confirmed(self) -> bool | None:
        return self.details.get("confirmed")


class FindingRecord(Suspicion):
    """A suspicion about one image; ``bbox`` in the file's pixels."""
    bbox: list[float] | None = None


class SampleRecord(Frozen):
    id: int
    path: str                       # relative to the data root
    label: str
    prediction: str
    confidence: float
    correct: bool
    explained: bool
    sha256: str | None = None
    size: list[int]                 # [width, height]
    findings: tuple[FindingRecord, ...] = ()

    @property
    def worst(self) -> str | None:
        return max((f.severity for f in self.findings), key=severity_rank, default=None)


class ClassFindingRecord(Suspicion):
    """A suspicion about how the model decides one class; ``region`` as fractions of the image."""
    cls: str = Field(alias="class")
    share: float
    region: list[float] | None = None


class Check(Frozen):
    state: CheckState
    examined: int | None = None     # images (or classes) it looked at
    reason: str = ""
    required: bool = False          # named in the config: the verdict needs it to have run (a method the
                                    # trust gate set aside did run: its verdict is evidence too)

    @property
    def words(self) -> str:
        """'ran on 40 images' / 'not run: needs masks or boxes in the manifest'."""
        if self.state == "ran":
            return "ran" + (f" on {self.examined} images" if self.examined is not None else "")
        return STATE_WORDS[self.state] + (f": {self.reason}" if self.reason else "")


class Coverage(Frozen):
    methods: dict[str, Check] = {}
    rules: dict[str, Check] = {}
    trust: Check | None = None
    intervention: Check | None = None

    def missing(self) -> list[tuple[str, str, Check]]:
        """(kind, name, check) of every method or check that was needed and did not run with
        evidence. A rule run by default that does not apply (off_object without masks) is not
        missing; one the config names is."""
        return [(kind, name, c) for kind, checks in (("method", self.methods), ("check", self.rules))
                for name, c in checks.items()
                if c.state in ("error", "no_evidence") or (c.required and c.state == "not_applicable")]

    def gaps(self) -> list[str]:
        """What keeps the audit from being complete, one line each."""
        out = [f"{kind} {name}: {c.words}" for kind, name, c in self.missing()]
        if self.rules and not any(c.state == "ran" for c in self.rules.values()):
            out.append("no check ran with evidence")
        elif self.methods and not self.rules:  # (a schema 1 run recorded neither)
            out.append("no check was asked for (rules is empty)")
        for name, c in (("intervention", self.intervention), ("trust gate", self.trust)):
            if c is not None and c.state == "error":
                out.append(f"{name}: {c.words}")
        return out


    def summary(self) -> str:
        """The gaps in one sentence, alike ones together: 'checks corner_border and look_alike: no
        evidence: every explanation method it reads failed or was not trusted'."""
        groups: dict[tuple[str, str], list[str]] = {}
        for kind, name, c in self.missing():
            groups.setdefault((kind, c.words), []).append(name)
        parts = [f"{kind}{'s' if len(names) > 1 else ''} {_and(names)}: {words}" for (kind, words), names in groups.items()]
        rest = [g for g in self.gaps() if not g.startswith(("method ", "check "))]
        return "; ".join(parts + rest)


def _and(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


class Metrics(Frozen):
    accuracy: float
    images: int
    misclassified: int
    explained: int
    per_class: list[dict[str, Any]]        # class, precision, recall, support
    confusion: dict[str, Any]              # classes, matrix (rows: true, columns: predicted)


class Gate(Frozen):
    passed: bool
    verdict: Verdict
    fail_on: str | None = None
    worst: str | None = None
    criteria: dict[str, Any] = {}
    waived: int = 0
    conditions: list[dict[str, Any]] = []
    failed: list[str] = []


class TreeView(Frozen):
    """A decision tree that mimics the model's decisions for one class (one against the rest)."""
    fidelity: float                 # held-out balanced agreement with the model
    depth: int
    path_length: float              # average decision-path length (Wu et al. 2018)
    reached: bool                   # fidelity reached the goal (90%) at some allowed depth
    rules: str                      # the tree as text rules
    decisions: int                  # explained images the model gave the class


class ClassView(Frozen):
    """What one class looks like to the model: its visualisation (activation maximisation),
    where its evidence lies in it, and how simple its decision is."""
    cls: str = Field(alias="class")
    picture: str | None = None      # the visualisation, a PNG as base64 (small: the model's input size)
    saliency: list[list[float]] = []  # its own saliency on a coarse grid, scaled to a maximum of 1
    logit: float | None = None      # the class logit it reaches
    region: list[float] | None = None  # the small window holding most of its evidence, as fractions
    evidence_share: float | None = None  # of its saliency, in that window
    carry_rate: float | None = None  # share of the other classes' visualisations that the window turns into the class
    tree: TreeView | None = None


class ProbeCurve(Frozen):
    """A linear probe's held-out accuracy at each layer group, for one property."""
    what: str                       # 'class' or 'cue'
    cls: str | None = None          # the cue's class
    region: list[float] | None = None
    rule: str | None = None         # the finding the cue comes from
    images: int
    chance: float
    accuracy: list[float]


class Views(Frozen):
    """Global views of the model: per class its visualisation and tree surrogate, probes per
    layer group, and the average decision-path length over the classes."""
    state: CheckState
    reason: str = ""
    seconds: float = 0.0
    layers: list[str] = []          # the layer groups the probes read, in forward order
    classes: list[ClassView] = []
    probes: list[ProbeCurve] = []
    average_path_length: float | None = None
    fidelity_goal: float = 0.9
    features: str = ""              # what the trees read, in words


class RunRecord(Frozen):
    schema_version: int = SCHEMA_VERSION
    run: dict[str, Any]
    coverage: Coverage = Coverage()
    gate: Gate | None = None
    metrics: Metrics
    samples: tuple[SampleRecord, ...]
    class_findings: tuple[ClassFindingRecord, ...] = ()
    changes: dict[str, Any] | None = None
    diff: dict[str, Any] | None = None
    skipped: list[dict[str, Any]] = []
    warnings: list[str] = []
    errors: list[dict[str, Any]] = []
    views: Views | None = None

    # ---- reading ------------------------------------------------------------------------------
    @property
    def classes(self) -> list[str]:
        return list(self.metrics.confusion.get("classes") or self.run.get("classes") or [])

    @property
    def config(self) -> dict:
        return self.run.get("config") or {}

    def by_id(self) -> dict[int, SampleRecord]:
        return {s.id: s for s in self.samples}

    def flagged(self) -> list[SampleRecord]:
        """Samples with findings, worst first (severity, then score; ties by path)."""
        top = lambda s: max((severity_rank(f.severity), f.score) for f in s.findings)  # noqa: E731
        return sorted((s for s in self.samples if s.findings), key=lambda s: (*(-v for v in top(s)), s.path))

    def findings(self) -> list[tuple[SampleRecord, FindingRecord]]:
        return [(s, f) for s in self.samples for f in s.findings]

    def every_finding(self) -> list[FindingRecord | ClassFindingRecord]:
        return [*self.class_findings, *(f for _, f in self.findings())]

    # ---- JSON ---------------------------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=1)

    @classmethod
    def from_doc(cls, doc: dict, where: str = "findings.json") -> RunRecord:
        if not isinstance(doc, dict) or not {"run", "samples", "class_findings", "metrics"} <= doc.keys():
            raise ConfigError(f"{where}: is not an auditor findings.json")
        version = doc.get("schema_version")
        if version not in READABLE_SCHEMAS:
            raise ConfigError(f"{where}: has schema_version {version!r}; this auditor reads schema_version "
                              f"{', '.join(map(str, READABLE_SCHEMAS))}")
        try:
            return cls.model_validate(upgrade(doc) if version == 1 else doc)
        except ValidationError as e:
            err = e.errors()[0]
            key = ".".join(str(p) for p in err["loc"])
            raise ConfigError(f"{where}: '{key}': {err['msg']}") from None

    @classmethod
    def load(cls, path: Path | str, where: str | None = None) -> RunRecord:
        """A run's record from its folder or its findings.json; ConfigError (one line) if unusable."""
        file = Path(path) / "findings.json" if Path(path).is_dir() else Path(path)
        where = where or str(file)
        if not file.is_file():
            raise ConfigError(f"{where}: no audit run at {path} (expected a run folder or its findings.json)")
        try:
            doc = json.loads(file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"{where}: {file} is not readable JSON: {str(e).splitlines()[0]}") from None
        return cls.from_doc(doc, where)


def beats(effect: dict, name: str, rate_ok: bool, margin: float) -> bool:
    """An intervention's effect confirms: its rate reached the threshold (``rate_ok``) and beats its
    placebo by ``margin``, the 95% interval of the difference above zero. Without a placebo (no
    room for one), the rate alone. (Here, not in judge: the report re-reads recorded tests.)"""
    vs = effect.get(f"{name}_vs_control")
    return bool(rate_ok) and (vs is None or (vs[0] >= margin and vs[1] > 0))


def pastes(effect: dict, rate_ok: bool, margin: float) -> bool:
    """A paste test confirms: it beats its random regions and, where that placebo ran, the class's
    own content of its size moved to the region's place (``beats`` for each)."""
    return beats(effect, "transfer", rate_ok, margin) and (
        "content_vs_control" not in effect or beats(effect, "content", rate_ok, margin))


def severity_rank(s: str | None) -> int:
    return -1 if s is None else SEVERITIES.index(s)


def upgrade(doc: dict) -> dict:
    """A schema 1 findings.json in schema 2's shape: sample ids by position, the verdict from
    ``passed`` (schema 1 had no INCOMPLETE), no coverage (not recorded then)."""
    doc = {**doc, "schema_version": SCHEMA_VERSION}
    doc["samples"] = [{"id": k, **s} for k, s in enumerate(doc["samples"])]
    gate = doc.get("gate")
    if gate is not None:
        doc["gate"] = {**gate, "verdict": "PASS" if gate.get("passed") else "FAIL"}
    return doc
