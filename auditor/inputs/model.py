"""Build the user's model from its factory, load weights safely, pick the device and layer."""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch
from torch import nn

from auditor.inputs.config import AuditConfig, ConfigError, import_object


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
        return load_file(str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ConfigError(f"model.weights: {path} cannot be loaded safely (weights_only=True): "
                          f"{str(e).splitlines()[0]}") from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]  # a common checkpoint layout
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ConfigError(f"model.weights: {path} is not a state dict of tensors")
    return state


def _names(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def build_model(cfg: AuditConfig, num_classes: int, device: torch.device) -> nn.Module:
    factory = import_object(cfg.model.factory, cfg.folder, "model.factory", cfg.source)
    try:
        model = factory(**cfg.model.kwargs)
    except Exception as e:
        raise ConfigError(f"{cfg.source}: 'model.factory': {cfg.model.factory} failed: "
                          f"{type(e).__name__}: {e}") from None
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
                              f"({'; '.join(parts)})")
        model.load_state_dict(state)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)  # explanations need input gradients only
    # One dry run: the output must be [B, num_classes] and finite.
    c, (h, w) = cfg.model.input.channels, cfg.model.input.size
    with torch.no_grad():
        out = model(torch.zeros(1, c, h, w, device=device))
    if not isinstance(out, torch.Tensor) or out.ndim != 2 or out.shape[1] != num_classes:
        got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ConfigError(f"{cfg.source}: model output has shape {got} for one image; expected (1, {num_classes}) "
                          f"= one logit per class in model.classes")
    return model


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
