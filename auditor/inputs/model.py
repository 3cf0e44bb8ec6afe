"""Build the user's model from its factory, load weights safely, pick the device and layer."""
from __future__ import annotations

import hashlib
import io
import pickletools
import zipfile
from pathlib import Path

import torch
from torch import nn

from auditor.inputs import huggingface
from auditor.inputs.config import AuditConfig, ConfigError, describe_exception, import_object

# What a state dict's pickle may import; anything else is code and the file is refused.
SAFE_GLOBAL_PREFIXES = ("torch.", "collections.OrderedDict", "_codecs.encode", "builtins.set",
                        "builtins.frozenset", "builtins.slice")


# model.reshape: how Grad-CAM reads the layer's output (auditor.explain.layers.read_as).
READINGS = ("auto", "vit", "swin", "none")
READING_ATTR = "_auditor_reading"  # a plain attribute: deep copies of the model keep it


def set_reading(module: nn.Module, reading: str) -> nn.Module:
    """Say how Grad-CAM reads layers of ``module``: set on a layer, that layer; on the model,
    every layer of it without a reading of its own. Returns ``module``."""
    if reading not in READINGS:
        raise ValueError(f"reshape must be one of {', '.join(READINGS)}, got {reading!r}")
    object.__setattr__(module, READING_ATTR, reading)  # not a submodule, parameter or buffer
    return module


def pick_device(wanted: str) -> torch.device:
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("run.device is 'cuda' but no CUDA device is available (use auto or cpu)")
    if wanted == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(wanted)


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Safetensors, or a torch state dict loaded with ``weights_only=True`` (no code execution)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError: truncated, garbage, empty
            raise ConfigError(f"model.weights: {path} is not a readable safetensors file "
                              f"(truncated or damaged?): {describe_exception(e)}") from None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        refused = unsafe_globals(path)
        if refused:
            raise ConfigError(f"model.weights: {path} was refused: loading it would import {', '.join(refused[:3])} "
                              f"(code, not tensors); only state dicts of tensors are loaded (weights_only=True)") from None
        why = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
        why = next((ln for ln in why if "GLOBAL" in ln or "central directory" in ln), why[-1] if why else "")
        why = why.split(". ")[0]  # torch's first sentence says what; the rest is advice
        raise ConfigError(f"model.weights: {path} cannot be loaded safely (weights_only=True): "
                          f"{type(e).__name__}: {why[:300]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a common checkpoint layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights: {path} is not a state dict of tensors")
    return state


def unsafe_globals(path: Path) -> list[str]:
    """The globals (``module.name``) a torch file's pickle would import beyond tensors, without
    running it: a zip checkpoint's ``data.pkl`` or a plain pickle. Empty when none or unreadable."""
    try:
        raw = path.read_bytes()
        if zipfile.is_zipfile(io.BytesIO(raw)):
            with zipfile.ZipFile(io.BytesIO(raw)) as z:
                name = next((n for n in z.namelist() if n.endswith("data.pkl")), None)
                raw = z.read(name) if name else b""
        found, strings = [], []
        for op, arg, _ in pickletools.genops(raw):
            if op.name in ("SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
                           "BINSTRING", "STRING"):
                strings.append(str(arg))
            elif op.name in ("GLOBAL", "INST"):
                found.append(str(arg).replace(" ", "."))
            elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
    except Exception:  # noqa: BLE001  (not a whole pickle: what it "imports" would be noise)
        return []
    return list(dict.fromkeys(g for g in found if not g.startswith(SAFE_GLOBAL_PREFIXES)))


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def on_device(model: nn.Module, cfg: AuditConfig, device: torch.device) -> nn.Module:
    """The model on ``device`` in eval mode with its parameters frozen (explanations need input
    gradients only); a device it cannot move to is a one-line error."""
    try:
        model = model.to(device).eval()
    except Exception as e:
        raise ConfigError(f"{cfg.source}: 'run.device': the model cannot move to {device}: "
                          f"{describe_exception(e)}") from None
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_model(cfg: AuditConfig, num_classes: int, device: torch.device) -> nn.Module:
    if cfg.model.huggingface is not None:  # a save_pretrained folder: auditor/inputs/huggingface.py
        return huggingface.build(cfg, num_classes, device)
    factory = import_object(cfg.model.factory, cfg.folder, "model.factory", cfg.source)
    try:
        model = factory(**cfg.model.kwargs)
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{cfg.source}: 'model.factory': {cfg.model.factory} failed: "
                          f"{describe_exception(e)}") from None
    if not isinstance(model, nn.Module):
        raise ConfigError(f"{cfg.source}: 'model.factory': returned {type(model).__name__}, not an nn.Module")
    if cfg.model.weights is not None:
        try:
            state = load_state_dict(cfg.model.weights)
        except ConfigError as e:
            raise ConfigError(f"{cfg.source}: {e}") from None
        own = model.state_dict()
        missing, unexpected = set(own) - set(state), set(state) - set(own)
        shape = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
        if missing or unexpected or shape:
            parts = []
            if missing:
                parts.append(f"missing in the file: {_names(missing)}")
            if unexpected:
                parts.append(f"not in the model: {_names(unexpected)}")
            if shape:
                parts.append("shape differs: " + _names(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                                                       for k in shape))
            raise ConfigError(f"{cfg.source}: 'model.weights': {cfg.model.weights.name} does not fit the model "
                              f"({'; '.join(parts)}){huggingface.prefix_hint(set(own), set(state))}")
        try:
            model.load_state_dict(state)
        except Exception as e:  # e.g. a dtype the module refuses
            raise ConfigError(f"{cfg.source}: 'model.weights': {cfg.model.weights.name} does not load: "
                              f"{describe_exception(e)}") from None
    model = on_device(model, cfg, device)
    model = huggingface.unwrap_logits(model, cfg, device)  # an output with .logits: its logits, with a note
    set_reading(model, cfg.model.reshape)  # how Grad-CAM reads the layer (model.reshape)
    dry_run(model, cfg, num_classes, device)
    return model


def dry_run(model: nn.Module, cfg: AuditConfig, num_classes: int, device: torch.device) -> None:
    """One all-zero input (the mean image, once normalised) of ``model.input``'s size: the output must be [1, num_classes] and finite."""
    c, (h, w) = cfg.model.input.channels, cfg.model.input.size
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, c, h, w, device=device))
    except (Exception, SystemExit) as e:
        raise ConfigError(f"{cfg.source}: 'model.input.size': the model fails on one {c}×{h}×{w} input "
                          f"(model.input.channels × size): {describe_exception(e)}") from None
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != num_classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{cfg.source}: model output has shape {got} for one image; expected (1, {num_classes}) "
                          f"= one logit per class in model.classes")
    if not torch.isfinite(out).all():
        key = "model.weights" if cfg.model.weights is not None else "model.factory"
        raise ConfigError(f"{cfg.source}: '{key}': the model's output is NaN or infinite for a plain "
                          f"{c}×{h}×{w} input; its weights or its forward are broken")


def target_layer(model: nn.Module, path: str | None, source: Path = Path("audit.yaml")) -> nn.Module | None:
    """The configured module, or the last Conv2d; None when the model has no convolution."""
    if path:
        try:
            return model.get_submodule(path)
        except AttributeError:
            convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
            raise ConfigError(f"{source}: 'model.target_layer': no module {path!r} (convolutions: {_names(convs, 8)})") from None
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1] if convs else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
