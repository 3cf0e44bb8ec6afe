"""Find the labelled images (ImageFolder tree or CSV manifest) and decode them for the model.

Any common mode (grayscale, RGBA, palette, 16-bit, float) becomes the model's channels and
size, resized and cropped as ``model.input`` says (``input_view``: squash, or the shorter side
and a centre crop); the file's own size is kept so regions map back to its pixels through the
crop. A file that cannot be decoded, is too large to decode safely or too small to audit is
skipped with its reason, never fatal. Nothing outside the declared data is read: a symlink
under ``data.root`` that points out of it, or a manifest path that leaves the manifest's folder,
is refused (skipped with the reason) unless ``data.allow_outside`` is set. A mask or box that does not fit its
image is dropped with a warning, so a silent ``off_object`` is explained.
"""
from __future__ import annotations

import csv
import hashlib
import io
import os
import re
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from auditor.inputs.config import AuditConfig, ConfigError, InputSpec, describe_exception, read_text

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}
MAX_ANNOTATION_WARNINGS = 20  # one per dropped mask or box; then a count


class DataError(Exception):
    """The data set cannot be audited; the message is one line for the user."""


@dataclass(frozen=True)
class SampleRef:
    path: Path                 # absolute
    rel: str                   # relative to the data root (or the manifest's folder); printable UTF-8
    label: int                 # -1 when the manifest row has none (then ``refused`` says so)
    mask: Path | None = None
    bbox: tuple[float, float, float, float] | None = None
    refused: str | None = None  # why the file is skipped without being read


def printable(name: str) -> str:
    """A file name as valid UTF-8: bytes that are not (surrogate-escaped by the OS) become \\xNN."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return os.fsencode(name).decode("utf-8", "backslashreplace")


def _inside(path: Path, folder: Path) -> bool:
    """Whether ``path``, with every symlink followed, lies in ``folder`` (itself resolved)."""
    try:
        return path.resolve().is_relative_to(folder)
    except (OSError, RuntimeError, ValueError):  # a symlink loop, a NUL in the name
        return False


def _outside_reason(path: Path, where: str) -> str:
    try:
        target = printable(str(path.resolve()))
    except (OSError, RuntimeError, ValueError):
        target = "nowhere it can be followed"
    return f"outside {where} (it resolves to {target}); not read (set data.allow_outside: true to allow)"


def discover(cfg: AuditConfig, classes: list[str]) -> tuple[list[SampleRef], list[str]]:
    """Return the samples (sorted by relative path) and warnings about the data set."""
    allow = cfg.data.allow_outside
    if cfg.data.root is not None:
        refs, warns = _image_folder(cfg.data.root, classes, allow)
    else:
        refs, warns = _manifest(cfg.data.manifest, classes, allow)
    if not refs:
        raise DataError(f"{cfg.data.root or cfg.data.manifest}: no images found")
    refs.sort(key=lambda r: r.rel)
    if cfg.data.limit is not None and cfg.data.limit < len(refs):
        # A seeded sample across classes, not the first N files of the first class.
        pick = np.random.default_rng(cfg.run.seed).choice(len(refs), cfg.data.limit, replace=False)
        refs = [refs[i] for i in sorted(pick)]
    refs, notes = check_annotations(refs)
    return refs, warns + notes


def _image_folder(root: Path, classes: list[str], allow_outside: bool = False) -> tuple[list[SampleRef], list[str]]:
    index = {name: i for i, name in enumerate(classes)}
    real_root = root.resolve()
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not folders:
        raise DataError(f"{root}: no class folders (expected {root}/<class>/<image>)")
    unknown = [printable(f.name) for f in folders if f.name not in index]
    if unknown:
        raise DataError(f"{root}: class folder(s) {', '.join(map(repr, unknown))} not in model.classes "
                        f"({', '.join(classes)})")
    refs, warns = [], []
    for folder in folders:
        found = 0
        for p in sorted(folder.rglob("*")):
            if p.name.startswith(".") or not (p.is_file() or (p.is_symlink() and not p.is_dir())):
                continue
            found += 1
            rel = printable(p.relative_to(root).as_posix())
            refused = None
            if not p.exists():
                refused = "a broken symlink (its target does not exist)"
            elif not allow_outside and not _inside(p, real_root):
                refused = "a symlink " + _outside_reason(p, "data.root")
            refs.append(SampleRef(p, rel, index[folder.name], refused=refused))
        if not found:
            warns.append(f"{folder}: empty class folder")
    return refs, warns


def _row_path(base: Path, real_base: Path, cell: str, allow_outside: bool) -> tuple[Path, str | None]:
    """The absolute path a manifest cell names, and why it is refused (None: it is not)."""
    p = Path(cell)
    full = p if p.is_absolute() else base / p
    if "\x00" in cell:
        return full, "the path contains a NUL character; not read"
    if allow_outside or _inside(full, real_base):
        return full, None
    return full, _outside_reason(full, "the manifest's folder")


def _manifest(path: Path, classes: list[str], allow_outside: bool = False) -> tuple[list[SampleRef], list[str]]:
    index = {name: i for i, name in enumerate(classes)}
    base = path.parent
    real_base = base.resolve()
    try:
        text = read_text(path, "the manifest")
    except ConfigError as e:
        raise DataError(str(e)) from None
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        names = reader.fieldnames or []
    except csv.Error as e:
        raise DataError(f"{path}:1: not a CSV file: {e}") from None
    reader.fieldnames = [(n or "").strip().lower() for n in names]  # "Path, Label" as Excel may write it
    missing = {"path", "label"} - set(reader.fieldnames)
    if missing:
        raise DataError(f"{path}: missing column(s) {', '.join(sorted(missing))} "
                        f"(columns: path, label, optional mask or bbox; found: {', '.join(reader.fieldnames)})")
    refs, warns = [], []
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as e:
            raise DataError(f"{path}:{reader.line_num}: not valid CSV: {e}") from None
        line = reader.line_num
        cell = lambda k: (row.get(k) or "").strip()  # noqa: E731  (a short row gives None)
        if not cell("path"):
            if any(cell(k) for k in reader.fieldnames):
                warns.append(f"{path}:{line}: row without a path; ignored")
            continue
        full, refused = _row_path(base, real_base, cell("path"), allow_outside)
        label = cell("label")
        if not label:
            refs.append(SampleRef(full, printable(cell("path")), -1,
                                  refused=refused or f"{path.name} line {line} has no label"))
            continue
        if label not in index:
            raise DataError(f"{path}:{line}: label {label!r} not in model.classes ({', '.join(classes)})")
        bbox = None
        if cell("bbox"):
            try:
                bbox = tuple(float(v) for v in cell("bbox").replace(",", " ").split())
                if len(bbox) != 4 or not all(np.isfinite(bbox)) or not (bbox[0] < bbox[2] and bbox[1] < bbox[3]):
                    raise ValueError
            except ValueError:
                warns.append(f"{path}:{line}: bbox must be 'x0 y0 x1 y1' with x0<x1, y0<y1, got {cell('bbox')!r}; "
                             f"the box is ignored")
                bbox = None
        mask = None
        if cell("mask"):
            mask, outside = _row_path(base, real_base, cell("mask"), allow_outside)
            if outside:
                warns.append(f"{path}:{line}: mask {printable(cell('mask'))} is {outside}; the mask is ignored")
                mask = None
        refs.append(SampleRef(full, printable(cell("path")), index[label], mask, bbox, refused))
    return refs, warns


def _header_size(path: Path) -> tuple[int, int]:
    """An image file's (width, height) from its header, without decoding its pixels."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(path) as im:
            return im.size


def check_annotations(refs: list[SampleRef]) -> tuple[list[SampleRef], list[str]]:
    """Drop, with a warning each, masks that are missing, not images or not the image's size, and
    boxes outside the image (boxes partly outside are clipped to it)."""
    out, notes = [], []
    for ref in refs:
        if ref.refused or (ref.mask is None and ref.bbox is None):
            out.append(ref)
            continue
        try:
            w, h = _header_size(ref.path)
        except Exception:  # noqa: BLE001  (the image itself is bad: decoding skips it with the reason)
            out.append(ref)
            continue
        mask, bbox = ref.mask, ref.bbox
        if mask is not None:
            why = None
            if not mask.is_file():
                why = f"mask {printable(str(mask))} not found"
            else:
                try:
                    size = _header_size(mask)
                    if size != (w, h):
                        why = f"mask is {size[0]}×{size[1]} px but the image is {w}×{h}"
                except Exception as e:  # noqa: BLE001
                    why = f"mask {printable(mask.name)} is not an image PIL can read ({type(e).__name__})"
            if why:
                notes.append(f"{ref.rel}: {why}; the mask is ignored (off_object does not judge this image)")
                mask = None
        if bbox is not None:
            x0, y0, x1, y1 = bbox
            c = (max(0.0, x0), max(0.0, y0), min(float(w), x1), min(float(h), y1))
            if c[0] >= c[2] or c[1] >= c[3]:
                notes.append(f"{ref.rel}: bbox {' '.join(f'{v:g}' for v in bbox)} lies outside the {w}×{h} image; "
                             f"the box is ignored")
                bbox = None
            elif c != bbox:
                notes.append(f"{ref.rel}: bbox {' '.join(f'{v:g}' for v in bbox)} reaches outside the {w}×{h} "
                             f"image; clipped to {' '.join(f'{v:g}' for v in c)}")
                bbox = c
        out.append(replace(ref, mask=mask, bbox=bbox) if (mask, bbox) != (ref.mask, ref.bbox) else ref)
    if len(notes) > MAX_ANNOTATION_WARNINGS:
        more = len(notes) - MAX_ANNOTATION_WARNINGS
        notes = notes[:MAX_ANNOTATION_WARNINGS] + [f"and {more} more masks or boxes ignored or clipped"]
    return out, notes


class _TooSmall(ValueError):
    pass


def read_image(source: Path | bytes, min_size: int = 1) -> Image.Image:
    """Decode a file (path or its bytes) into an 8-bit RGB or L image; ValueError says why it cannot be."""
    raw = source if isinstance(source, bytes) else Path(source).read_bytes()
    if not raw:
        raise ValueError("empty file (0 bytes)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(raw))
            w, h = img.size
            if min(w, h) < min_size:
                raise _TooSmall(f"image is {w}×{h} px, below data.min_size ({min_size} px) on a side")
            img.load()  # decode now: a truncated file fails here, not later
    except UnidentifiedImageError:
        raise ValueError("not an image file PIL can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        n = re.search(r"\((\d+) pixels\)", str(e))
        raise ValueError(f"image too large to decode safely ({n.group(1) + ' pixels' if n else str(e)}; the limit is "
                         f"{Image.MAX_IMAGE_PIXELS}, PIL's decompression-bomb guard)") from None
    except (OSError, SyntaxError, EOFError) as e:
        raise ValueError(f"corrupt or truncated image: {describe_exception(e)}") from None
    except _TooSmall:
        raise
    except Exception as e:  # noqa: BLE001  (a decoder's own bug, e.g. struct.error: still one bad file)
        raise ValueError(f"cannot decode: {describe_exception(e)}") from None
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


@dataclass(frozen=True)
class View:
    """How a file of ``file`` (w, h) px becomes the model input: resized to ``resized`` (w, h), then
    the pixels ``crop`` (left, top, right, bottom) of that taken. PIL's resize maps pixel edges
    linearly, so the model input shows exactly the file's rectangle ``box``."""
    file: tuple[int, int]
    resized: tuple[int, int]
    crop: tuple[int, int, int, int]

    @property
    def box(self) -> tuple[float, float, float, float]:
        """The part of the file the model input shows, in file pixels [x0, y0, x1, y1]."""
        sx, sy = self.file[0] / self.resized[0], self.file[1] / self.resized[1]
        left, top, right, bottom = self.crop
        return left * sx, top * sy, right * sx, bottom * sy

    @property
    def frac(self) -> tuple[float, float, float, float]:
        """``box`` as fractions of the file (0, 0, 1, 1 when the model sees all of it)."""
        (w, h), (x0, y0, x1, y1) = self.file, self.box
        return x0 / w, y0 / h, x1 / w, y1 / h

    def to_file(self, frac_box) -> tuple[float, float, float, float]:
        """A box as fractions of the model input [x0, y0, x1, y1] in file pixels."""
        x0, y0, x1, y1 = self.box
        w, h = x1 - x0, y1 - y0
        return (x0 + frac_box[0] * w, y0 + frac_box[1] * h, x0 + frac_box[2] * w, y0 + frac_box[3] * h)

    def to_file_frac(self, frac_box) -> tuple[float, float, float, float]:
        """A box as fractions of the model input in fractions of the file (to draw on the file)."""
        (w, h), (x0, y0, x1, y1) = self.file, self.to_file(frac_box)
        return x0 / w, y0 / h, x1 / w, y1 / h

    def to_input(self, file_box) -> tuple[float, float, float, float]:
        """A box in file pixels as fractions of the model input, clipped to what the model saw
        (empty, x0 == x1 or y0 == y1, where it saw none of it)."""
        x0, y0, x1, y1 = self.box
        w, h = x1 - x0, y1 - y0
        fx0, fx1 = (min(max((file_box[k] - x0) / w, 0.0), 1.0) for k in (0, 2))
        fy0, fy1 = (min(max((file_box[k] - y0) / h, 0.0), 1.0) for k in (1, 3))
        return fx0, fy0, max(fx0, fx1), max(fy0, fy1)


def input_view(file_size: tuple[int, int], spec: InputSpec | None) -> View:
    """Where the model input lies in a file of ``file_size`` (w, h), by ``model.input``'s resize and
    crop, with torchvision's arithmetic: ``Resize(int)`` keeps the aspect with the long side
    truncated, ``CenterCrop`` rounds its offset. No spec: the whole file."""
    w, h = (int(v) for v in file_size)
    if spec is None:
        return View((w, h), (w, h), (0, 0, w, h))
    ch, cw = spec.size
    if spec.resize == "shorter_side":
        short = spec.resize_to or max(ch, cw)
        rw, rh = (short, int(short * h / w)) if w <= h else (int(short * w / h), short)
    else:
        rh, rw = spec.resize_to or spec.size
    if spec.crop == "none":
        return View((w, h), (rw, rh), (0, 0, rw, rh))
    left, top = int(round((rw - cw) / 2.0)), int(round((rh - ch) / 2.0))
    return View((w, h), (rw, rh), (left, top, left + cw, top + ch))


def to_input_mask(mask: Image.Image, v: View, shape: tuple[int, int]) -> np.ndarray:
    """A mask in file pixels (any non-zero value marks) as the model input shows it, at ``shape``
    (h, w): the view's box of it, nearest-neighbour resampled."""
    return np.asarray(mask.convert("L").resize(shape[::-1], Image.NEAREST, box=v.box)) > 0


def to_model_input(img: Image.Image, spec: InputSpec) -> torch.Tensor:
    """Resize, crop (``input_view``) and normalise a decoded image into a float tensor [C, H, W]."""
    img = img.convert("RGB" if spec.channels == 3 else "L")
    v = input_view(img.size, spec)
    if img.size != v.resized:
        img = img.resize(v.resized, Image.Resampling[spec.interpolation.upper()])
    if v.crop != (0, 0, *v.resized):
        img = img.crop(v.crop)
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(-1, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(-1, 1, 1)
    return (x - mean) / std


class ImageDataset(torch.utils.data.Dataset):
    """Decodes one sample; a bad file yields its reason instead of a tensor."""

    def __init__(self, refs: list[SampleRef], spec: InputSpec, min_size: int = 1):
        self.refs, self.spec, self.min_size = refs, spec, min_size

    def __len__(self) -> int:
        return len(self.refs)

    def __getitem__(self, i: int):
        """(index, tensor, (width, height), sha256 of the file, reason it was skipped)."""
        ref = self.refs[i]
        if ref.refused:
            return i, None, None, None, ref.refused
        try:
            raw = ref.path.read_bytes()
        except (OSError, ValueError) as e:
            return i, None, None, None, f"cannot read file: {getattr(e, 'strerror', None) or e}"
        digest = hashlib.sha256(raw).hexdigest()
        try:
            img = read_image(raw, self.min_size)
            return i, to_model_input(img, self.spec), img.size, digest, None
        except ValueError as e:
            return i, None, None, digest, str(e)
        except Exception as e:  # noqa: BLE001  (one bad file never costs the audit)
            return i, None, None, digest, f"cannot decode: {describe_exception(e)}"


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


def batches(refs: list[SampleRef], spec: InputSpec, batch_size: int, workers: int = 0, pin: bool = False,
            min_size: int = 1):
    """Decoded batches in order; ``pin`` page-locks them so the copy to a GPU overlaps compute."""
    loader = torch.utils.data.DataLoader(ImageDataset(refs, spec, min_size), batch_size=batch_size, shuffle=False,
                                         num_workers=workers, collate_fn=collate, pin_memory=pin)
    yield from loader


def load_classes(cfg: AuditConfig) -> list[str]:
    if cfg.model.classes is not None:
        names = cfg.model.classes
    else:
        text = read_text(cfg.model.classes_file, "model.classes_file")
        names = [ln.strip() for ln in text.splitlines() if ln.strip()]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes or not names:
        raise ConfigError(f"{cfg.source}: 'model.classes': " +
                          (f"duplicate class name(s) {', '.join(dupes)}" if dupes else "no class names"))
    return names
