"""Hugging Face image classifiers: a ``save_pretrained`` folder as a model returning logits.

``model: {huggingface: path/to/folder}`` loads the folder with
``AutoModelForImageClassification.from_pretrained(folder, local_files_only=True,
use_safetensors=True, trust_remote_code=False)``: nothing is downloaded, no pickle is read and
no code from the folder runs. The model is wrapped in ``Logits``, whose forward returns the
output's ``.logits`` tensor. Where the config gives no ``model.classes`` (or ``classes_file``),
the class names are ``config.json``'s ``id2label``; where it gives no ``model.input``, the size,
resize, centre crop, resampling, mean and std come from ``preprocessor_config.json`` (and the
channels from ``config.json``'s ``num_channels``).

A factory's model whose output is such an object (``.logits``) or a dict with ``"logits"`` is
wrapped the same way by ``unwrap_logits``, with a note (``Logits.note``) instead of a refusal.
``model.output`` names another element (a field or key, or an index into a tuple), for either.
"""
from __future__ import annotations

import contextlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from auditor.inputs.config import AuditConfig, ConfigError, InputSpec, describe_exception

CONFIG, PREPROCESSOR = "config.json", "preprocessor_config.json"


def logits_of(out: Any) -> Any:
    """The logits tensor of a model's output: the output itself, its ``.logits`` or its
    ``["logits"]``; anything else is returned as it is (the dry run then says what it is)."""
    if isinstance(out, Tensor):
        return out
    if isinstance(out, Mapping) and isinstance(out.get("logits"), Tensor):
        return out["logits"]
    return out.logits if isinstance(getattr(out, "logits", None), Tensor) else out


def structure(out: Any) -> str:
    """What an output is made of, in words, for errors."""
    if isinstance(out, Tensor):
        return f"a tensor of shape {tuple(out.shape)}"
    if isinstance(out, Mapping):
        return f"{type(out).__name__} with keys {', '.join(map(str, list(out)[:8])) or 'none'}"
    if isinstance(out, (tuple, list)):
        return f"a {type(out).__name__} of {len(out)}"
    fields = [k for k, v in vars(out).items() if not k.startswith("_")] if hasattr(out, "__dict__") else []
    return f"{type(out).__name__}" + (f" with fields {', '.join(fields[:8])}" if fields else "")


def pick(out: Any, output: str | int | None) -> Any:
    """The element ``output`` (``model.output``: a key or field NAME, or an INDEX into a tuple, a
    list or a dict's values) of a model's output; ``logits_of`` where None. ValueError when there
    is no such element or it is not a tensor."""
    if output is None:
        return logits_of(out)
    if isinstance(output, int):
        seq = list(out.values()) if isinstance(out, Mapping) else out if isinstance(out, (tuple, list)) else None
        found = seq[output] if seq is not None and -len(seq) <= output < len(seq) else None
    elif isinstance(out, Mapping):
        found = out.get(output)
    else:
        found = getattr(out, output, None)
    if not isinstance(found, Tensor):
        what = "has no element" if found is None else f"has a {type(found).__name__}, not a tensor, at"
        raise ValueError(f"the model's output ({structure(out)}) {what} {output!r}")
    return found


class Logits(nn.Module):
    """``model`` whose forward returns the logits tensor of the wrapped model's output: its
    ``output`` element (``model.output``), else the output itself or its ``.logits``."""

    def __init__(self, model: nn.Module, note: str = "", output: str | int | None = None):
        super().__init__()
        self.model, self.note, self.output = model, note, output

    def forward(self, x: Tensor) -> Tensor:
        return pick(self.model(x), self.output)


def unwrap_logits(model: nn.Module, cfg: AuditConfig, device: torch.device) -> nn.Module:
    """``model``, or ``Logits(model)``: with ``model.output``, its element (checked on one
    all-zero input: a ConfigError naming the key where there is none); else with a note where that
    input shows that its output is an object with ``.logits`` (a Hugging Face output) or a dict
    with ``"logits"``."""
    c, (h, w) = cfg.model.input.channels, cfg.model.input.size
    chosen = cfg.model.output
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, c, h, w, device=device))
    except (Exception, SystemExit):  # the dry run that follows reports it
        return model if chosen is None else Logits(model, output=chosen)
    if chosen is not None:
        try:
            pick(out, chosen)
        except ValueError as e:
            raise ConfigError(f"{cfg.source}: 'model.output': {e}") from None
        return Logits(model, output=chosen)
    if isinstance(out, Tensor) or logits_of(out) is out:
        return model
    field = ".logits" if isinstance(getattr(out, "logits", None), Tensor) else '["logits"]'
    return Logits(model, f"model.factory: the model returns {type(out).__name__}, not a tensor; "
                         f"its {field} are audited")


def _read_json(path: Path, key: str) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"'{key}': not given, and {path} does not exist") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ConfigError(f"'{key}': not given, and {path} is not readable JSON: {describe_exception(e)}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"'{key}': not given, and {path} is not a JSON object")
    return data


def class_names(folder: Path) -> list[str]:
    """``config.json``'s ``id2label`` in index order (0..K-1, every index once)."""
    labels = _read_json(folder / CONFIG, "model.classes").get("id2label")
    where = f"'model.classes': not given, and {folder / CONFIG}"
    if not isinstance(labels, dict) or not labels:
        raise ConfigError(f"{where} has no id2label; give model.classes")
    try:
        index = {int(k): str(v) for k, v in labels.items()}
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: id2label keys must be class indices, got {sorted(labels)[:3]}") from None
    if sorted(index) != list(range(len(index))):
        raise ConfigError(f"{where}: id2label must number the classes 0..{len(index) - 1}, got {sorted(index)[:8]}")
    return [index[i] for i in range(len(index))]


def _side(value: Any) -> tuple[int, int] | None:
    """(H, W) from a processor's ``size``/``crop_size`` given as {height, width} or an int."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return int(value["height"]), int(value["width"])
    return None


# PIL's resampling numbers, as processors save them (PILImageResampling).
RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def geometry(proc: dict) -> dict:
    """``model.input``'s size, resize, resize_to and crop as the processor resizes and crops.

    The generic processor resizes to ``size`` ({height, width}: squash; {shortest_edge}: the
    shorter side) and then, where ``do_center_crop``, crops ``crop_size`` from the centre. Three
    processors resize their own way (transformers' ``image_processing_pil_*.py``): ConvNeXt
    (also ResNet's and RegNet's) scales the shorter side to ``shortest_edge / crop_pct`` and crops
    ``shortest_edge``, or squashes at 384 and above; PoolFormer scales by ``1 / crop_pct`` too; LeViT
    scales the shorter side by 256/224. ValueError says why the processor cannot be followed."""
    kind = str(proc.get("image_processor_type") or "").removesuffix("Fast").removesuffix("Pil")
    size, crop_pct = proc.get("size"), proc.get("crop_pct")
    short = size.get("shortest_edge") if isinstance(size, dict) else None
    if not proc.get("do_resize", True):
        raise ValueError("do_resize is false: the model takes each file at its own size")
    if isinstance(size, dict) and {"longest_edge", "max_height", "max_width"} & set(size):
        raise ValueError(f"size {size} bounds the longer side, so inputs have no one size")
    out: dict = {"size": _side(size), "resize": "squash", "resize_to": None, "crop": "none"}
    if kind == "ConvNextImageProcessor" and short is not None:
        if short < 384:
            pct = float(crop_pct if crop_pct is not None else 224 / 256)
            out = {"size": (short, short), "resize": "shorter_side", "resize_to": int(short / pct), "crop": "center"}
        else:
            out["size"] = (short, short)
    elif kind == "PoolFormerImageProcessor" and crop_pct is not None:
        hw = (short, short) if short is not None else _side(size)
        if hw is None:
            raise ValueError(f"size {size!r} is not {{shortest_edge}} or {{height, width}}")
        if hw[0] == hw[1]:  # one side given: the shorter side scaled
            out.update(size=None, resize="shorter_side", resize_to=int(hw[0] / float(crop_pct)))
        else:
            out["size"] = (int(hw[0] / float(crop_pct)), int(hw[1] / float(crop_pct)))
    elif short is not None:
        scaled = int(256 / 224 * short) if kind == "LevitImageProcessor" else int(short)
        out.update(size=None, resize="shorter_side", resize_to=scaled)
    if proc.get("do_center_crop"):
        crop = _side(proc.get("crop_size"))
        if crop is None:
            raise ValueError(f"do_center_crop with no usable crop_size ({proc.get('crop_size')!r})")
        if out["resize"] == "squash" and out["resize_to"] is None:
            out["resize_to"] = out["size"]  # squash to size, then crop crop_size of it
        out.update(size=crop, crop="center")
    if out["size"] is None:
        if out["resize"] == "shorter_side":
            raise ValueError(f"size {size} resizes the shorter side with no crop, so inputs have no one size")
        raise ValueError(f"gives no usable size ({size!r})")
    if out["resize_to"] is not None and out["resize_to"] == out["size"]:
        out["resize_to"] = None
    return out


def input_spec(folder: Path) -> InputSpec:
    """Size, resize, crop, interpolation, channels, mean and std from ``preprocessor_config.json``
    (``geometry``; see docs/models.md)."""
    proc = _read_json(folder / PREPROCESSOR, "model.input")
    where = f"'model.input': not given, and {folder / PREPROCESSOR}"
    try:
        geo = geometry(proc)
    except (TypeError, ValueError, ZeroDivisionError) as e:
        why = str(e) if type(e) is ValueError else describe_exception(e, 200)  # ours, or a malformed value
        raise ConfigError(f"{where}: {why}; give model.input") from None
    try:
        channels = int(_read_json(folder / CONFIG, "model.input").get("num_channels", 3))
    except (TypeError, ValueError):
        channels = 3
    # The processor feeds (p * 255 * r - mean) / std for pixels p in [0, 1] (r = rescale_factor
    # where do_rescale); auditor feeds (p - mean') / std', so mean' = mean / (255 r), std' = std / (255 r).
    scale = 255.0 * (float(proc.get("rescale_factor", 1 / 255)) if proc.get("do_rescale", True) else 1.0)
    if proc.get("do_normalize", True):
        mean, std = proc.get("image_mean", [0.0]), proc.get("image_std", [1.0])
    else:
        mean, std = [0.0], [1.0]
    mean = [float(m) / scale for m in (mean if isinstance(mean, list) else [mean])]
    std = [float(s) / scale for s in (std if isinstance(std, list) else [std])]
    interpolation = RESAMPLE.get(proc.get("resample"), "bilinear")
    try:
        return InputSpec(channels=channels, mean=mean, std=std, interpolation=interpolation, **geo)
    except Exception as e:  # pydantic's ValidationError: a channel count or stats that do not fit
        raise ConfigError(f"{where} gives an input auditor cannot use ({describe_exception(e, 200)}); "
                          f"give model.input") from None


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """No progress bars or load reports on the console for the duration."""
    from transformers.utils import logging
    bars, level = logging.is_progress_bar_enabled(), logging.get_verbosity()
    logging.disable_progress_bar()
    logging.set_verbosity_error()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def load(folder: Path, source: Path = Path("audit.yaml")) -> Logits:
    """The folder's image classifier, on the CPU, wrapped to return logits."""
    try:
        from transformers import AutoModelForImageClassification
    except ImportError:
        raise ConfigError(f"{source}: 'model.huggingface': needs the transformers package "
                          f"(pip install 'auditor[hf]')") from None
    if not (folder / CONFIG).is_file():
        raise ConfigError(f"{source}: 'model.huggingface': {folder} has no {CONFIG}; give a folder "
                          f"written by save_pretrained")
    try:
        with _quiet_transformers():
            model = AutoModelForImageClassification.from_pretrained(
                str(folder), local_files_only=True, use_safetensors=True, trust_remote_code=False)
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{source}: 'model.huggingface': {folder} does not load as an image classifier "
                          f"(from_pretrained, safetensors only, no remote code): {describe_exception(e)}") from None
    return Logits(model)


def prefix_hint(own: set[str], found: set[str]) -> str:
    """Where the model's keys are the file's with one prefix added (or removed), e.g. a wrapper's
    ``model.``: a sentence that says so; else ''."""
    for a, b, how in ((own, found, "add"), (found, own, "lack")):
        for key in sorted(a)[:1]:
            for cut in range(1, key.count(".") + 1):
                prefix = ".".join(key.split(".")[:cut]) + "."
                if {k[len(prefix):] for k in a if k.startswith(prefix)} == b and all(k.startswith(prefix) for k in a):
                    return (f"; the model's keys {how} the prefix {prefix!r} to the file's"
                            f" (a wrapper module?): load the weights inside the factory, or save the"
                            f" wrapper's state dict, or use model.huggingface for a save_pretrained folder"
                            if how == "add" else
                            f"; the file's keys carry the prefix {prefix!r} the model's lack (saved from a "
                            f"wrapper?): save the inner model's state dict")
    return ""


def build(cfg: AuditConfig, num_classes: int, device: torch.device) -> nn.Module:
    """The ``model.huggingface`` folder's classifier on ``device``, in eval mode, frozen, checked
    by the dry run, with ``input_shape`` = (C, H, W) for the default-layer probe."""
    from auditor.inputs.model import dry_run, on_device, set_reading  # model.py dispatches here
    model = on_device(load(cfg.model.huggingface_folder, cfg.source), cfg, device)
    model.input_shape = (cfg.model.input.channels, *cfg.model.input.size)
    if cfg.model.output is not None:  # another element than .logits
        model = unwrap_logits(model.model, cfg, device)
        model.input_shape = (cfg.model.input.channels, *cfg.model.input.size)
    set_reading(model, cfg.model.reshape)
    dry_run(model, cfg, num_classes, device)
    return model

