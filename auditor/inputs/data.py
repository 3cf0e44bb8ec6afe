"""Find the labelled images (ImageFolder tree or CSV manifest) and decode them for the model.

Any common mode (grayscale, RGBA, palette, 16-bit, float) becomes the model's channels and
size; the file's own size is kept so regions map back to its pixels. A file that cannot be
decoded is skipped with its reason, never fatal.
"""
from __future__ import annotations

import csv
import hashlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from auditor.inputs.config import AuditConfig, ConfigError, InputSpec

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


class DataError(Exception):
    """The data set cannot be audited; the message is one line for the user."""


@dataclass(frozen=True)
class SampleRef:
    path: Path                 # absolute
    rel: str                   # relative to the data root (or the manifest's folder)
    label: int
    mask: Path | None = None
    bbox: tuple[float, float, float, float] | None = None


def discover(cfg: AuditConfig, classes: list[str]) -> tuple[list[SampleRef], list[str]]:
    """Return the samples (sorted by relative path) and warnings about the data set."""
    if cfg.data.root is not None:
        refs, warns = _image_folder(cfg.data.root, classes)
    else:
        refs, warns = _manifest(cfg.data.manifest, classes)
    if not refs:
        raise DataError(f"{cfg.data.root or cfg.data.manifest}: no images found")
    refs.sort(key=lambda r: r.rel)
    if cfg.data.limit is not None and cfg.data.limit < len(refs):
        # A seeded sample across classes, not the first N files of the first class.
        pick = np.random.default_rng(cfg.run.seed).choice(len(refs), cfg.data.limit, replace=False)
        refs = [refs[i] for i in sorted(pick)]
    return refs, warns


def _image_folder(root: Path, classes: list[str]) -> tuple[list[SampleRef], list[str]]:
    index = {name: i for i, name in enumerate(classes)}
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    unknown = [f.name for f in folders if f.name not in index]
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(map(repr, unknown))} not in model.classes "
                        f"({', '.join(classes)})")
    refs, warns = [], []
    for folder in folders:
        files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            warns.append(f"{folder}: empty class folder")
        refs += [SampleRef(p, p.relative_to(root).as_posix(), index[folder.name]) for p in files]
    return refs, warns


def _manifest(path: Path, classes: list[str]) -> tuple[list[SampleRef], list[str]]:
    index = {name: i for i, name in enumerate(classes)}
    base = path.parent
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        missing = {"path", "label"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                            f"(columns: path, label, optional mask or bbox)")
        refs = []
        for line, row in enumerate(reader, start=2):
            label = row["label"].strip()
            if label not in index:
                raise DataError(f"{path}:{line}: label {label!r} not in model.classes ({', '.join(classes)})")
            bbox = None
            if (row.get("bbox") or "").strip():
                try:
                    bbox = tuple(float(v) for v in row["bbox"].split())
                    assert len(bbox) == 4 and bbox[0] < bbox[2] and bbox[1] < bbox[3]
                except (ValueError, AssertionError):
                    raise DataError(f"{path}:{line}: bbox must be 'x0 y0 x1 y1' with x0<x1, y0<y1, "
                                    f"got {row['bbox']!r}") from None
            mask = (base / row["mask"].strip()) if (row.get("mask") or "").strip() else None
            refs.append(SampleRef(base / row["path"].strip(), row["path"].strip(), index[label], mask, bbox))
    return refs, []


def read_image(source: Path | bytes) -> Image.Image:
    """Decode a file (path or its bytes) into an 8-bit RGB or L image; ValueError says why it cannot be."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not raw:
        raise ValueError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            img.load()  # decode now: a truncated file fails here, not later
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can read") from None
    except (OSError, SyntaxError, Image.DecompressionBombWarning) as e:
        raise ValueError(f"corrupt or truncated image: {e}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit and float images: scale to 8 bits by the type's range, not by clipping.
        arr = np.asarray(img, dtype=np.float64)
        peak = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        if img.mode == "F":
            peak = max(float(arr.max()), 1e-12) if arr.max() > 1 else 1.0
        img = Image.fromarray(np.clip(arr / peak * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    elif img.mode == "P":
        img = img.convert("RGBA")
    if img.mode not in ("RGB", "L"):
        img = img.convert("RGB")  # RGBA, LA, CMYK, YCbCr, 1: drop alpha like torchvision's loader
    return img


def to_model_input(img: Image.Image, spec: InputSpec) -> torch.Tensor:
    """Resize (bilinear) and normalise a decoded image into a float tensor [C, H, W]."""
    img = img.convert("RGB" if spec.channels == 3 else "L")
    h, w = spec.size
    if img.size != (w, h):
        img = img.resize((w, h), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


class ImageDataset(torch.utils.data.Dataset):
    """Decodes one sample; a bad file yields its reason instead of a tensor."""

    def __init__(self, refs: list[SampleRef], spec: InputSpec):
        self.refs, self.spec = refs, spec

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        """(index, tensor, (width, height), sha256 of the file, reason it was skipped)."""
        try:
            raw = self.refs[i].path.read_bytes()
        except OSError as e:
            return i, None, None, None, f"cannot read file: {e.strerror or e}"
        digest = hashlib.sha256(raw).hexdigest()
        try:
            img = read_image(raw)
            return i, to_model_input(img, self.spec), img.size, digest, None
        except ValueError as e:
            return i, None, None, digest, str(e)


@dataclass
class Batch:
    ids: list[int]                   # sample ids that decoded
    x: torch.Tensor | None           # [B, C, H, W]
    sizes: list[tuple[int, int]]     # file (width, height) per decoded sample
    hashes: list[str]                # file sha256 per decoded sample
    skipped: list[tuple[int, str]]   # (sample id, reason)

    def pin_memory(self) -> "Batch":  # called by the DataLoader when pin_memory=True
        if self.x is not None:
            self.x = self.x.pin_memory()
        return self


def collate(items) -> Batch:
    """Batch the decodable samples; pass the failures through with their reasons."""
    good = [it for it in items if it[4] is None]
    x = torch.stack([it[1] for it in good]) if good else None
    return Batch([it[0] for it in good], x, [it[2] for it in good], [it[3] for it in good],
                 [(it[0], it[4]) for it in items if it[4] is not None])


def batches(refs: list[SampleRef], spec: InputSpec, batch_size: int, workers: int = 0, pin: bool = False):
    """Decoded batches in order; ``pin`` page-locks them so the copy to a GPU overlaps compute."""
    loader = torch.utils.data.DataLoader(ImageDataset(refs, spec), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate, pin_memory=pin)
    yield from loader


def load_classes(cfg: AuditConfig) -> list[str]:
    if cfg.model.classes is not None:
        names = cfg.model.classes
    else:
        names = [ln.strip() for ln in cfg.model.classes_file.read_text().splitlines() if ln.strip()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or not names:
        raise ConfigError(f"{cfg.source}: 'model.classes': " +
                          (f"duplicate class name(s) {', '.join(dupes)}" if dupes else "no class names"))
    return names
