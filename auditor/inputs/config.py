"""The audit config (``audit.yaml``): pydantic models, validated before any work starts.

Every error is one line that names the file, the key and what is allowed.
Relative paths are resolved against the config file's folder.
"""
from __future__ import annotations

import datetime as dt
import difflib
import functools
import importlib
import importlib.util
import re
import sys
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

SEVERITIES = ("info", "low", "medium", "high", "critical")
Severity = Literal["info", "low", "medium", "high", "critical"]


class ConfigError(Exception):
    """A config that cannot be run; the message is one line for the user."""


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class InputSpec(Strict):
    size: tuple[int, int] = Field(description="model input [H, W]")
    channels: Literal[1, 3] = 3
    mean: list[float] = [0.0]
    std: list[float] = [1.0]
    # How the file becomes the model input (auditor.inputs.data.input_view): resized, then cropped to ``size``.
    resize: Literal["squash", "shorter_side"] = Field(
        "squash", description="squash: the whole file stretched to resize_to [H, W]; shorter_side: its shorter "
        "side scaled to resize_to, keeping its aspect (torchvision's Resize(int), HF's shortest_edge)")
    resize_to: int | tuple[int, int] | None = Field(
        None, description="squash: [H, W] (default: size); shorter_side: the shorter side's length "
        "(default: size's larger side)")
    crop: Literal["none", "center"] = Field("none", description="center: the middle size of the resized image "
                                            "(needed with shorter_side, or a squash resize_to larger than size)")
    interpolation: Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"] = "bilinear"

    @model_validator(mode="after")
    def _stats_fit_channels(self):
        for name in ("mean", "std"):
            value = getattr(self, name)
            if len(value) not in (1, self.channels):
                raise ValueError(f"{name} has {len(value)} values; give 1 or {self.channels} (one per channel)")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        if min(self.size) < 8:
            raise ValueError("size must be at least [8, 8]")
        h, w = self.size
        if self.resize == "shorter_side":
            if isinstance(self.resize_to, tuple):
                raise ValueError(f"resize_to must be one length with resize: shorter_side, got {list(self.resize_to)}")
            if self.crop != "center":
                raise ValueError("resize: shorter_side needs crop: center (resized files differ in shape; "
                                 "the crop gives them one size)")
            if self.resize_to is not None and self.resize_to < max(h, w):
                raise ValueError(f"resize_to ({self.resize_to}) is below size's larger side ({max(h, w)}): "
                                 f"the centre crop would not fit")
        else:
            to = (self.resize_to, self.resize_to) if isinstance(self.resize_to, int) else self.resize_to or (h, w)
            if to[0] < h or to[1] < w:
                raise ValueError(f"resize_to {list(to)} is smaller than size {[h, w]}: the crop would not fit")
            if tuple(to) != (h, w) and self.crop != "center":
                raise ValueError(f"resize_to {list(to)} differs from size {[h, w]}: give crop: center")
            self.resize_to = tuple(to) if self.resize_to is not None else None
        return self


class ModelSpec(Strict):
    factory: str | None = Field(None, description="package.module:function or path/to/file.py:function")
    huggingface: Path | None = Field(None, description="instead of factory: a Hugging Face save_pretrained folder "
                                     "(config.json, model.safetensors, preprocessor_config.json)")
    kwargs: dict[str, Any] = {}
    weights: Path | None = None
    classes: list[str] | None = None
    classes_file: Path | None = None
    input: InputSpec | None = None
    target_layer: str | None = None
    output: str | int | None = Field(None, description="which element of the model's output is the logits: "
                                     "a field or key NAME, or an INDEX into a tuple (default: the output itself, "
                                     "or its .logits)")
    reshape: Literal["auto", "vit", "swin", "none"] = Field(
        "auto", description="how Grad-CAM reads a token layer: auto (from its shape), vit (class token, then "
        "a patch grid), swin (a patch grid, or channels last), none (a [B, C, h, w] map as it is)")

    @field_validator("factory")
    @classmethod
    def _factory_form(cls, v: str | None) -> str | None:
        if v is not None and ":" not in v:
            raise ValueError("must be 'package.module:function' or 'path/to/file.py:function'")
        return v

    @field_validator("weights")
    @classmethod
    def _weights_suffix(cls, v: Path | None) -> Path | None:
        if v is not None and v.suffix not in (".safetensors", ".pt", ".pth"):
            raise ValueError("must be a .safetensors file or a state-dict .pt/.pth file")
        return v

    @model_validator(mode="after")
    def _one_class_source(self):
        if (self.factory is None) == (self.huggingface is None):
            raise ValueError("give exactly one of model.factory (a function that builds the model) or "
                             "model.huggingface (a save_pretrained folder)")
        if self.huggingface is not None:
            if self.kwargs or self.weights is not None:
                raise ValueError("model.kwargs and model.weights do not go with model.huggingface "
                                 "(its folder's model.safetensors is loaded)")
            if self.__dict__["classes"] is not None and self.classes_file is not None:  # as given: no folder read
                raise ValueError("give at most one of model.classes or model.classes_file "
                                 "(none: config.json's id2label)")
            # The folder's weights: resolved against the config's folder and checked like any weights
            # file (after prepare), hashed into the record; ``huggingface_folder`` is their folder.
            self.weights = self.huggingface / "model.safetensors"
            return self
        if (self.classes is None) == (self.classes_file is None):
            raise ValueError("give exactly one of model.classes or model.classes_file")
        if self.input is None:
            raise ValueError("model.input is required with model.factory: {size: [H, W], channels, mean, std}")
        return self

    @property
    def huggingface_folder(self) -> Path | None:
        """The model.huggingface folder, resolved (the parent of its resolved weights file)."""
        return None if self.huggingface is None else self.weights.parent

    def __getattribute__(self, name: str):
        """With model.huggingface, ``classes`` and ``input`` not given are read from the folder at
        first use (after ``prepare``, which may write it): id2label, preprocessor_config.json."""
        value = super().__getattribute__(name)
        if value is None and name in ("classes", "input") and super().__getattribute__("huggingface") is not None \
                and not (name == "classes" and super().__getattribute__("classes_file") is not None):
            from auditor.inputs import huggingface
            folder = self.huggingface_folder
            value = huggingface.class_names(folder) if name == "classes" else huggingface.input_spec(folder)
            self.__dict__[name] = value
        return value


class DataSpec(Strict):
    root: Path | None = None
    manifest: Path | None = None
    limit: int | None = Field(None, gt=0)
    min_size: int = Field(8, ge=1, description="images whose width or height is below this many pixels are "
                                              "skipped with the reason")
    allow_outside: bool = Field(False, description="read files outside data.root (symlinks) or the manifest's "
                                                   "folder (../ or absolute paths); refused by default")

    @model_validator(mode="after")
    def _one_source(self):
        if (self.root is None) == (self.manifest is None):
            raise ValueError("give exactly one of data.root (an ImageFolder tree) or data.manifest (a CSV)")
        return self


class ExplainSpec(Strict):
    # name -> params; None means the recommended set
    methods: dict[str, dict[str, Any]] | None = None
    samples: Literal["misclassified", "all", "low_confidence"] = "misclassified"
    threshold: float = Field(0.6, gt=0, le=1, description="confidence below which low_confidence explains")
    # Class-level rules compare classes, so they need heatmaps of correctly classified images too.
    per_class: int = Field(24, ge=0, description="correctly classified images explained per predicted class")
    resolution: int = Field(64, ge=8, le=512, description="side of the heatmaps kept for rules and overlays")

    @field_validator("methods", mode="before")
    @classmethod
    def _list_to_dict(cls, v):
        return _names_to_params(v)


class InterventionSpec(Strict):
    enabled: bool = True
    fill: str = Field("inpaint", pattern="^(inpaint|blur|mean)$")
    transplant_images: int = Field(40, ge=0, description="images of other classes each region is pasted onto")
    class_images: int = Field(40, ge=1, description="images of the class a class-level region is removed from")
    restore_images: int = Field(5, ge=1, description="true-class images a region is restored from (contrast findings)")
    remove_drop: float = Field(0.5, gt=0, le=1, description="share of images whose decision must change")
    transplant_rate: float = Field(0.5, gt=0, le=1, description="share of pasted images that must turn")
    critical_rate: float = Field(0.8, gt=0, le=1, description="transfer rate that makes a confirmed finding critical")
    pad: float = Field(0.02, ge=0, le=0.2, description="margin added around a region, as a share of the image side")
    controls: int = Field(3, ge=0, le=20, description="placebo regions (random boxes of the same size elsewhere) "
                                                      "each test is repeated with; 0: no placebo")
    control_margin: float = Field(0.25, ge=0, le=1, description="how much an effect must beat its placebo's rate "
                                                                "(and its 95% interval exclude zero) to confirm")


class TrustSpec(Strict):
    enabled: bool = True
    images: int = Field(16, ge=1, description="explained images the deletion test (and the fill check) runs on")
    cascade_images: int = Field(8, ge=1, description="of those, the images the randomisation cascade explains "
                                "at each step")
    steps: int = Field(6, ge=2, description="deletion curve steps (each a forward pass of the test images per "
                       "method; the ends are shared)")
    early_stop: bool = Field(True, description="decide a method's deletion test on the cascade images alone when "
                             "their 99.5% interval already does (else on all the test images, at 95%); and try on "
                             "the other test images only the fills not clearly worse on the cascade images")
    max_spearman: float = Field(0.6, gt=0, le=1, description="mean |rank correlation| with the original heatmaps "
                                "allowed once the top decide_at of the cascade is randomised; a method fails when "
                                "its 95% interval over the images lies above (docs/trust.md)")
    min_benefit: float = Field(0.02, description="a method fails the deletion test when the 95% interval over the "
                               "images of its benefit (the random order's area under the probability curve minus its "
                               "own) lies wholly below this")
    max_deletion_ratio: float = Field(0.9, gt=0, description="no longer read (min_benefit replaced it); accepted so "
                                      "older configs load")
    min_effect: float = Field(0.05, ge=0, le=1, description="below this mean fall of the probability in either "
                              "order, removal barely moves the prediction: the deletion test is inconclusive")
    fill: Literal["auto", "road", "blur", "mean", "zero"] = Field(
        "auto", description="what replaces removed pixels: auto (the candidate under which removing random blobs "
        "alone changes the predictions least), road (noisy linear imputation), blur, mean, or zero (input space)")
    fill_share: float = Field(0.3, gt=0, lt=1, description="share of each image the fill check removes at random")
    max_fill_flips: float = Field(0.25, ge=0, le=1, description="if even the chosen fill flips more than this share "
                                  "of the predictions in the fill check, removal is itself a signal to the model: "
                                  "the deletion test is inconclusive")
    fallback: Literal["occlusion"] | None = Field("occlusion", description="if no explanation method passes, the "
                                                  "rules read this model-only method's heatmaps (null: none)")
    cascade: Literal["blocks", "modules"] = Field("blocks", description="randomisation steps: blocks (top-level "
                                                  "children, expanded a level at a time while they fit in "
                                                  "cascade_steps) or modules (every module with parameters)")
    cascade_steps: int = Field(8, ge=2, description="most steps of a blocks cascade (a ResNet-50 gives 6: stem, "
                               "four stages, head; a deeper or flatter net is grouped into this many)")
    decide_at: float = Field(0.5, gt=0, le=1, description="share of the cascade steps, from the top, randomised "
                             "when the similarity is judged (0.5: the top half; 1: the whole model)")
    full_cascade: bool = Field(False, description="run every cascade step (for the chart), not only down to the "
                               "decisive one")
    curve: bool = Field(False, description="explain the cascade images after every step down to the decisive one, "
                        "for the report's curve (false: after the decisive step only, the same decision at a "
                        "third of a ResNet-50's cascade cost)")
    max_ssim: float | None = Field(None, gt=0, le=1, description="if set, mean SSIM with the original heatmaps "
                                   "allowed at that step too (the paper's second measure)")


class ViewsSpec(Strict):
    """The global views ("How the model sees each class"): bounded so they cost a small share of the audit."""
    enabled: bool = True
    steps: int = Field(48, ge=1, le=1000, description="activation-maximisation steps per class visualisation")
    max_classes: int = Field(20, ge=1, description="classes visualised (the most predicted)")
    window: float = Field(0.15, gt=0, le=0.5, description="side of the evidence window, of the image's")
    probe_images: int = Field(150, ge=10, description="images for the class-label probe")
    max_cues: int = Field(4, ge=0, description="confirmed cue regions probed")


class FailOn(Strict):
    """Gate conditions: the run fails when any one that is set is met (``fail_on: high`` = severity,
    and, as always unless switched off, ``incomplete``)."""
    incomplete: bool = Field(True, description="fail (verdict INCOMPLETE) when a method or check could not run "
                                               "with evidence: exit 0 means examined and passed")
    severity: Severity | None = Field(None, description="a finding (not waived) at or above this severity")
    new_findings: int | None = Field(None, ge=1, description="this many findings new since report.baseline")
    new_severity: Severity = Field("info", description="least severity a new finding must have to count")
    accuracy_drop: float | None = Field(None, gt=0, le=1, description="accuracy this much below the baseline's")
    class_recall_drop: float | None = Field(None, gt=0, le=1, description="a class's recall this much below")


class Reviewer(Strict):
    name: str = Field(min_length=1)
    role: str | None = None
    decision: Literal["pending", "approved", "rejected"] = "pending"
    signed_off: dt.date | None = Field(None, description="date of the sign-off, YYYY-MM-DD")
    note: str | None = None


class ReportSpec(Strict):
    out: Path = Path("reports")
    formats: list[Literal["html", "pdf", "json", "csv"]] = ["html", "pdf", "json", "csv"]
    fail_on: FailOn | None = FailOn(severity="high")
    baseline: Path | Literal["last_passed"] | None = Field(
        None, description="an earlier run folder (or its findings.json) to compare with; last_passed: "
                          "the newest passing run in report.out")
    reviewer: Reviewer | None = None
    gallery_limit: int = Field(100, ge=0, description="flagged images shown as full cards, worst first")
    thumbnail_limit: int = Field(1000, ge=0, description="further flagged images shown as small numbered "
                                                         "pictures after the cards")
    self_contained: bool = Field(True, description="report.html carries its pictures inside it (one file to "
                                                   "send); false: it links to images/ beside it. The PDF is the same")

    @field_validator("fail_on", mode="before")
    @classmethod
    def _severity_shorthand(cls, v):
        return {"severity": v} if isinstance(v, str) else v

    @field_validator("reviewer", mode="before")
    @classmethod
    def _name_shorthand(cls, v):
        return {"name": v} if isinstance(v, str) else v


class Waiver(Strict):
    """A known finding accepted until ``expires``; waived findings are kept and shown, but pass the gate."""
    model_config = ConfigDict(extra="forbid", populate_by_name=True, serialize_by_alias=True)
    rule: str
    class_: str | None = Field(None, alias="class", description="a class finding's class, or the class "
                                                                "the model predicted for an image")
    paths: list[str] = Field([], description="image paths as in findings.json; * and ? match")
    hashes: list[str] = Field([], description="image sha256 as in findings.json samples[].sha256")
    owner: str = Field(min_length=1)
    reason: str = Field(min_length=1)
    expires: dt.date

    @field_validator("expires", mode="before")
    @classmethod
    def _iso_date(cls, v):
        if not isinstance(v, dt.date) and not (isinstance(v, str) and re.fullmatch(r"\d{4}-\d{2}-\d{2}", v)):
            raise ValueError("must be a date YYYY-MM-DD")
        return v

    @field_validator("hashes")
    @classmethod
    def _sha256(cls, v: list[str]) -> list[str]:
        bad = [h for h in v if not re.fullmatch(r"[0-9a-f]{64}", h)]
        if bad:
            raise ValueError(f"{bad[0]!r} is not a sha256 (64 hex digits, as in samples[].sha256)")
        return v


class RunSpec(Strict):
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(64, gt=0)
    seed: int = 0
    workers: int = Field(0, ge=0, description="DataLoader worker processes for decoding")
    cache: bool | Path = Field(True, description="true: <report.out>/.cache; false: off; or a file path")
    max_memory: int = Field(2048, ge=64, description="MB one method's model calls may use; sizes internal batches")
    engine: Literal["local", "ray"] = "local"
    ray_address: str | None = Field(None, description="a running Ray cluster; default: start a local one")
    ray_workers: int = Field(2, ge=1, description="actors, each holding one copy of the model")


class AuditSpec(Strict):
    """Who and what the audit is about, for page 1 of the report (all optional)."""
    name: str | None = Field(None, description="the model's name; default: the factory or Hugging Face folder's name")
    version: str | None = None
    owner: str | None = Field(None, description="the team or person answerable for the model")
    intended_use: str | None = Field(None, description="what the model is for, in a sentence")
    data_description: str | None = Field(None, description="what the audited images are, in a sentence")


class AuditConfig(Strict):
    prepare: str | None = Field(None, description="module:function called with the config folder first")
    model: ModelSpec
    data: DataSpec
    explain: ExplainSpec = ExplainSpec()
    rules: dict[str, dict[str, Any]] | None = None
    intervention: InterventionSpec = InterventionSpec()
    trust: TrustSpec = TrustSpec()
    views: ViewsSpec = ViewsSpec()
    report: ReportSpec = ReportSpec()
    run: RunSpec = RunSpec()
    waivers: list[Waiver] = []
    audit: AuditSpec = AuditSpec()

    # Set by load_config, not by the user.
    source: Path = Field(Path("audit.yaml"), exclude=True)

    @field_validator("rules", mode="before")
    @classmethod
    def _list_to_dict(cls, v):
        return _names_to_params(v)

    @property
    def folder(self) -> Path:
        return self.source.parent


def _names_to_params(v):
    """Accept ``[a, {b: {k: 1}}]`` or ``{a: null, b: {k: 1}}``; give ``{name: params}``."""
    def params(name, p) -> dict:
        if p is not None and not isinstance(p, dict):
            raise ValueError(f"the params of {name!r} must be a mapping, got {p!r}")
        return dict(p or {})

    if v is None or isinstance(v, dict):
        return None if v is None else {k: params(k, p) for k, p in v.items()}
    if isinstance(v, list):
        out: dict[str, dict] = {}
        for item in v:
            if isinstance(item, str):
                out[item] = {}
            elif isinstance(item, dict) and len(item) == 1:
                (name, p), = item.items()
                out[name] = params(name, p)
            else:
                raise ValueError(f"each entry must be a name or {{name: {{params}}}}, got {item!r}")
        return out
    raise ValueError("must be a list of names or a mapping of name to params")


def _set_key(data: dict, dotted: str, value: Any) -> None:
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        if node.get(part) is None:  # absent, or an empty section in the file ('run:' alone)
            node[part] = {}
        node = node[part]
        if not isinstance(node, dict):
            raise ConfigError(f"--set {dotted}: {part} is not a section")
    node[leaf] = value


def _describe(error: dict, model: type[BaseModel]) -> str:
    key = ".".join(str(p) for p in error["loc"]) or "(top level)"
    kind = error["type"]
    if kind == "extra_forbidden":
        parent = model
        for part in error["loc"][:-1]:
            if isinstance(part, int):
                continue  # a list index: the item has the list's model
            field = parent.model_fields.get(str(part)) if isinstance(parent, type) else None
            ann = field.annotation if field else None
            parent = next((a for a in (ann, *get_args(ann)) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        allowed = sorted(f.alias or k for k, f in parent.model_fields.items() if not f.exclude) if parent else []
        hint = f"; allowed: {', '.join(allowed)}" if allowed else ""
        close = difflib.get_close_matches(str(error["loc"][-1]), allowed, n=1)
        hint += f"; did you mean '{close[0]}'?" if close else ""
        return f"unknown key '{key}'{hint}"
    if kind == "missing":
        return f"missing key '{key}'"
    return f"'{key}': {error['msg'].removeprefix('Value error, ')}"


# A config is a few KB; these bound what a hostile or broken one can cost before validation.
MAX_CONFIG_BYTES = 1 << 20
MAX_YAML_NODES = 100_000  # values after expanding aliases (a "billion laughs" file expands to 10^9)


class _Loader(yaml.SafeLoader):
    """Safe YAML, stricter: a duplicate key and an impossible date are errors with their line."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue  # '<<: *base' then overriding a key is not a duplicate
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node.start_mark.line + 1)
                except TypeError:
                    continue  # an unhashable key: the base class reports it
                if first != key_node.start_mark.line + 1:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {first})", key_node.start_mark)
        return super().construct_mapping(node, deep)

    def construct_yaml_timestamp(self, node):
        try:
            return super().construct_yaml_timestamp(node)
        except (ValueError, OverflowError) as e:
            raise yaml.constructor.ConstructorError(
                None, None, f"{node.value!r} is not a valid date ({e})", node.start_mark) from None


_Loader.add_constructor("tag:yaml.org,2002:timestamp", _Loader.construct_yaml_timestamp)


def _bound(node) -> None:
    """Refuse a document whose aliases expand past ``MAX_YAML_NODES`` values (or loop)."""
    stack, count = [node], 0
    while stack:
        n = stack.pop()
        count += 1
        if count > MAX_YAML_NODES:
            raise yaml.constructor.ConstructorError(
                None, None, f"the document expands to more than {MAX_YAML_NODES} values "
                            f"(aliases that repeat aliases?)", node.start_mark)
        if isinstance(n, yaml.SequenceNode):
            stack += n.value
        elif isinstance(n, yaml.MappingNode):
            stack += [x for pair in n.value for x in pair]


def parse_yaml(text: str, where: str):
    """Plain data from YAML text, or ConfigError naming ``where``, the line and the column."""
    loader = None
    try:
        loader = _Loader(text)
        node = loader.get_single_node()
        if node is None:
            return None
        _bound(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
        problem = getattr(e, "problem", None) or (str(e).splitlines() or ["?"])[0]
        if "constructor for the tag" in problem:
            problem += " (a config is plain data: tags such as !!python are not allowed)"
        at = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
        raise ConfigError(f"{where}: not valid YAML: {at}{problem}") from None
    except RecursionError:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()


def read_text(path: Path, what: str, limit: int | None = None) -> str:
    """A text file as UTF-8 (a BOM is dropped), or a one-line ConfigError naming it."""
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise ConfigError(f"{path}: cannot read {what}: {e.strerror or e}") from None
    if limit is not None and len(raw) > limit:
        raise ConfigError(f"{path}: {what} is {len(raw)} bytes; at most {limit} are read")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: {what} is not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start}); "
                          f"save it as UTF-8") from None


def _one_line(text: str) -> str:
    return " ".join(text.replace("\r", "\n").split("\n"))


def load_config(path: str | Path, overrides: list[str] = ()) -> AuditConfig:
    """Read, override (``key.sub=value``, value parsed as YAML) and validate a config file."""
    try:
        return _load_config(Path(path), overrides)
    except ConfigError as e:
        raise ConfigError(_one_line(str(e))) from None


def _load_config(path: Path, overrides) -> AuditConfig:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    data = parse_yaml(read_text(path, "the config file", MAX_CONFIG_BYTES), str(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections (model, data, ...)")
    if "source" in data:
        raise ConfigError(f"{path}: unknown key 'source'")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. model.weights=x.safetensors")
        _set_key(data, key.strip(), parse_yaml(raw, f"--set {item!r}"))
    try:
        cfg = AuditConfig.model_validate({**data, "source": path.resolve()})
    except ValidationError as e:
        raise ConfigError(f"{path}: {_describe(e.errors()[0], AuditConfig)}") from None
    except RecursionError:
        raise ConfigError(f"{path}: nested too deeply") from None
    return resolve_paths(cfg)


def resolve_paths(cfg: AuditConfig) -> AuditConfig:
    base = cfg.folder
    fix = lambda p: None if p is None else (p if p.is_absolute() else base / p)  # noqa: E731
    cfg.model.weights = fix(cfg.model.weights)
    cfg.model.classes_file = fix(cfg.model.classes_file)
    cfg.data.root = fix(cfg.data.root)
    cfg.data.manifest = fix(cfg.data.manifest)
    cfg.report.out = fix(cfg.report.out)
    if isinstance(cfg.report.baseline, Path):
        cfg.report.baseline = fix(cfg.report.baseline)
    return cfg


def check_files(cfg: AuditConfig) -> None:
    """After ``prepare`` has run: every file the config names must exist."""
    hf = cfg.model.huggingface_folder
    if hf is not None and not (hf / "model.safetensors").is_file():
        raise ConfigError(f"{cfg.source}: 'model.huggingface': no model.safetensors in {hf} (expected a "
                          f"save_pretrained folder with safetensors weights)" if hf.is_dir() else
                          f"{cfg.source}: 'model.huggingface': folder not found: {hf}")
    for key, p in [("model.weights", cfg.model.weights), ("model.classes_file", cfg.model.classes_file),
                   ("data.manifest", cfg.data.manifest)]:
        if p is not None and not p.is_file():
            raise ConfigError(f"{cfg.source}: '{key}': file not found: {p}")
    if cfg.data.root is not None and not cfg.data.root.is_dir():
        raise ConfigError(f"{cfg.source}: 'data.root': folder not found: {cfg.data.root}")


def import_object(spec: str, base: Path, key: str, source: Path) -> Any:
    """``pkg.mod:name`` or ``path/to/file.py:name`` (relative to the config folder)."""
    target, _, name = spec.rpartition(":")
    try:
        if target.endswith(".py"):
            file = Path(target) if Path(target).is_absolute() else base / target
            if not file.is_file():
                raise ConfigError(f"{source}: '{key}': file not found: {file}")
            mod_name = f"_auditor_user_{file.stem}"
            loader_spec = importlib.util.spec_from_file_location(mod_name, file)
            module = importlib.util.module_from_spec(loader_spec)
            sys.modules[mod_name] = module
            loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except ConfigError:
        raise
    except (Exception, SystemExit) as e:  # the user's module failed to import: say which and why
        raise ConfigError(f"{source}: '{key}': cannot import {target!r}: {describe_exception(e)}") from None
    if not hasattr(module, name):
        raise ConfigError(f"{source}: '{key}': {target!r} has no attribute {name!r}")
    obj = getattr(module, name)
    if key == "prepare" and callable(obj):
        return _failing_as_config_error(obj, f"{source}: 'prepare': {spec}")
    return obj


def describe_exception(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, at most ``limit`` characters of the message."""
    text = _one_line(str(e)).strip()
    text = text if len(text) <= limit else text[:limit - 1] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _failing_as_config_error(fn, where: str):
    """``fn`` whose exceptions (and sys.exit) become one-line ConfigErrors naming ``where``."""
    @functools.wraps(fn)
    def call(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ConfigError:
            raise
        except (Exception, SystemExit) as e:
            raise ConfigError(f"{where} failed: {describe_exception(e)}") from None
    return call
