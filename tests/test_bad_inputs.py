"""Bad inputs and faults (issue 13): each is one clear line naming what and where, a recorded skip
with its reason, or a refusal, and none of them loses the audit.

Every case builds a tiny project (12 images of 24×28 px, a small CNN, saliency, corner_border,
json only), breaks one thing and runs ``auditor run CONFIG --quiet`` in-process. It asserts the
exit code (0 passed, 2 could not run), the message (one line, naming the file, key or image), and
that nothing was lost: the other images are all audited, or, when the run cannot start, no run
folder (finished or half-written) is left.
"""
from __future__ import annotations

import json
import os
import pickle
import re
import shutil
import sqlite3
import struct
import textwrap
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from typer.testing import CliRunner

from auditor.cli import app
from auditor.inputs.config import ConfigError, load_config

from conftest import NET_PY

runner = CliRunner()
N = 12  # images in the fixture project: 4 per class

# Models that misbehave, next to the config; a pure white image is 2.0 everywhere once normalised.
BAD_PY = NET_PY + textwrap.dedent('''
    import sys

    class Wrap(nn.Module):
        def __init__(self, mode):
            super().__init__()
            self.inner, self.mode = make(), mode

        def forward(self, x):
            out = self.inner(x)
            white = (x > 1.99).flatten(1).all(1)
            if self.mode == "raise_white" and white.any():
                raise RuntimeError("this model cannot take a white image")
            if self.mode == "nan_white":
                out = torch.where(white[:, None], torch.full_like(out, float("nan")), out)
            if self.mode == "nan_real":  # finite on the all-zero dry run, NaN on every real image
                out = torch.where((x.abs().flatten(1).sum(1) > 0)[:, None], torch.full_like(out, float("nan")), out)
            if self.mode == "nan_all":
                out = out * float("nan")
            if self.mode == "tuple":
                out = (out, out)
            return out

    def wrapped(mode):
        return Wrap(mode)

    def flat():  # fits 16×16 inputs only
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3))

    def leaves():
        sys.exit(0)

    def boom(folder):
        raise RuntimeError("the data server is down")

    def quits(folder):
        sys.exit(0)
''')


# ---------------------------------------------------------------------------------- the project


@pytest.fixture
def proj(project):
    """The conftest project made as quick as possible: corner_border on saliency, json only."""
    project.cfg["explain"].update(samples="misclassified", per_class=2)
    project.cfg["rules"] = ["corner_border"]
    project.cfg["intervention"] = {"enabled": False}
    project.cfg["report"]["formats"] = ["json"]
    (project.folder / "bad.py").write_text(BAD_PY)
    project.write()
    return project


def cat(p) -> Path:
    return p.folder / "data" / "cat"


def image(path: Path, size=(28, 24), colour=None, seed=1) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(arr).save(path)
    else:
        Image.new("RGB", size, colour).save(path)
    return path


def png_header(w: int, h: int) -> bytes:
    """A PNG that declares w×h pixels and holds none: PIL's size guard judges it at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 1, 0, 0, 0, 0)) + chunk(b"IEND", b"")


def manifest(p, rows: list[str], header: str = "path,label", encoding="utf-8", bom=False) -> None:
    """A manifest over the fixture's images plus ``rows``."""
    lines = [header] + [f"data/{c}/{c}_{k}.png,{c}" for c in ("cat", "dog", "fox") for k in range(4)] + rows
    text = "\n".join(lines) + "\n"
    (p.folder / "val.csv").write_bytes((b"\xef\xbb\xbf" if bom else b"") + text.encode(encoding))
    p.cfg["data"] = {"manifest": "val.csv"}
    p.write()


def model(p, factory: str) -> None:
    p.cfg["model"]["factory"] = factory
    p.cfg["model"].pop("weights", None)
    p.write()


def raw_config(p, text: str) -> None:
    p.path.write_text(text)


def base_yaml(p) -> str:
    return yaml.safe_dump(p.cfg)


def audit(p, *args):
    return runner.invoke(app, ["run", str(p.path), "--quiet", *args])


def runs(p) -> list[Path]:
    out = p.folder / "reports"
    return sorted(x for x in out.iterdir() if x.name != ".cache") if out.is_dir() else []


def record(p) -> dict:
    (run,) = runs(p)
    assert not run.name.startswith("."), run
    return json.loads((run / "findings.json").read_text())


def one_line(text: str) -> bool:
    return "\n" not in text.strip() and "\r" not in text


# ---------------------------------------------------------------------------------- the cases


@dataclass
class Case:
    id: str
    setup: Callable                  # (project) -> extra CLI args or None
    code: int                        # expected exit code
    kind: str                        # error | skipped | warning | ok
    expect: tuple[str, ...]          # substrings of the message (error line, skip reason, warning)
    path: str | None = None          # skipped: the image's path in findings.json (a regex)
    images: int = N                  # ok/skipped/warning: images audited
    xfail: str | None = None
    check: Callable | None = None    # (project, findings.json or None, output): further assertions


def _set(*pairs):
    return lambda p: [a for k in pairs for a in ("--set", k)]


def _write(rel: str, data: bytes):
    def setup(p):
        f = p.folder / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_bytes(data)
    return setup


def _symlink(rel: str, target: Callable[[Path], Path], allow=False):
    def setup(p):
        t = target(p.folder)
        (p.folder / rel).parent.mkdir(parents=True, exist_ok=True)
        os.symlink(t, p.folder / rel)
        if allow:
            p.cfg["data"]["allow_outside"] = True
            p.write()
    return setup


def _outside_image(folder: Path) -> Path:
    return image(folder / "elsewhere" / "secret.png")


def _fox_outside(p):
    shutil.move(p.folder / "data" / "fox", p.folder / "elsewhere_fox")
    os.symlink(p.folder / "elsewhere_fox", p.folder / "data" / "fox")


def _non_utf8_name(p):
    name = os.fsdecode(b"caf\xe9.png")
    image(cat(p) / name)


def _hostile_name(p):
    image(cat(p) / "a\nb\x1b[31m.png")


def _corrupt_png(p):
    good = bytearray((cat(p) / "cat_0.png").read_bytes())
    i = good.index(b"IDAT") + 10
    good[i:i + 20] = b"\x00" * 20
    (cat(p) / "damaged.png").write_bytes(bytes(good))


def _jpeg(p, name: str, damage: Callable[[bytes], bytes]):
    path = cat(p) / name
    Image.open(cat(p) / "cat_0.png").save(path, quality=90)
    path.write_bytes(damage(path.read_bytes()))


def _garbage(n: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _thin(p):
    image(cat(p) / "thin.png", size=(3, 4000), colour=(200, 10, 10))


def _tiny(p):
    image(cat(p) / "dot.png", size=(1, 1), colour=(255, 255, 255))


def _seven(p):
    image(cat(p) / "seven.png", size=(7, 7))


def _manifest_rows(*rows, header="path,label", **kw):
    def setup(p):
        manifest(p, list(rows), header=header, **kw)
    return setup


def _manifest_outside(allow=False):
    def setup(p):
        img = image(p.folder.parent / f"{p.folder.name}-outside.png")
        manifest(p, [f"../{img.name},cat"])
        if allow:
            p.cfg["data"]["allow_outside"] = True
            p.write()
    return setup


def _annot(header, row, mask=None):
    def setup(p):
        if mask is not None:
            mask(p)
        manifest(p, [], header=header)
        text = (p.folder / "val.csv").read_text().splitlines()
        text[1] = row
        (p.folder / "val.csv").write_text("\n".join(text) + "\n")
    return setup


def _mask_wrong_size(p):
    Image.new("L", (5, 5), 255).save(p.folder / "m.png")


def _mask_text(p):
    (p.folder / "m.png").write_text("not a mask")


def _bomb_yaml(p):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for k, name in enumerate("bcdefgh"):
        prev = "abcdefgh"[k]
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    raw_config(p, base_yaml(p) + "\n".join(lines) + "\n")


def _waiver(date: str):
    def setup(p):
        raw_config(p, base_yaml(p) + f"waivers:\n  - {{rule: corner_border, owner: jo, reason: known, "
                                     f"expires: {date}}}\n")
    return setup


def _duplicate_run(p):
    raw_config(p, base_yaml(p) + "run:\n  batch_size: 7\n")


def _syntax_error(p):
    raw_config(p, base_yaml(p) + "explain: [unclosed\n")


def _latin1_config(p):
    p.path.write_bytes(base_yaml(p).encode() + "# réglage\n".encode("latin-1"))


def _latin1_classes(p):
    (p.folder / "classes.txt").write_bytes("cat\ndog\nfox\n# chât\n".encode("latin-1"))
    p.cfg["model"].pop("classes")
    p.cfg["model"]["classes_file"] = "classes.txt"
    p.write()


def _python_tag(p):
    raw_config(p, base_yaml(p) + "prepare: !!python/object/apply:os.system ['echo pwned']\n")


def _big_config(p):
    raw_config(p, base_yaml(p) + "#" + "x" * (1 << 20) + "\n")


def _key(section, key, value):
    def setup(p):
        p.cfg.setdefault(section, {})[key] = value
        p.write()
    return setup


def _weights_bytes(make_bytes, name="w.safetensors"):
    def setup(p):
        good = (p.folder / "weights.safetensors").read_bytes()
        (p.folder / name).write_bytes(make_bytes(good))
        p.cfg["model"]["weights"] = name
        p.write()
    return setup


def _evil_pt(p):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    (p.folder / "evil.pt").write_bytes(pickle.dumps({"0.weight": Evil()}))
    p.cfg["model"]["weights"] = "evil.pt"
    p.write()


def _evil_pt_zip(p):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))
    torch.save({"0.weight": Evil()}, p.folder / "evil.pt")
    p.cfg["model"]["weights"] = "evil.pt"
    p.write()


def _truncated_pt(p):
    ns: dict = {}
    exec(NET_PY, ns)
    torch.save(ns["make"]().state_dict(), p.folder / "w.pt")
    raw = (p.folder / "w.pt").read_bytes()
    (p.folder / "w.pt").write_bytes(raw[: len(raw) // 2])
    p.cfg["model"]["weights"] = "w.pt"
    p.write()


def _white(factory):
    def setup(p):
        image(cat(p) / "white.png", colour=(255, 255, 255))
        model(p, factory)
    return setup


def _prepare(fn):
    def setup(p):
        p.cfg["prepare"] = f"bad.py:{fn}"
        p.write()
    return setup


def _wrong_input_size(p):
    model(p, "bad.py:flat")
    p.cfg["model"]["input"]["size"] = [20, 20]
    p.write()


def _net_syntax_error(p):
    (p.folder / "net.py").write_text("def make(:\n")


def _net_exits(p):
    (p.folder / "net.py").write_text("import sys\nsys.exit(0)\n")


def _cache_path(p) -> Path:
    return p.folder / "reports" / ".cache" / "cache.sqlite"


def _cache_garbage(p):
    _cache_path(p).parent.mkdir(parents=True)
    _cache_path(p).write_bytes(_garbage(8192))


def _cache_pages(p):
    assert audit(p).exit_code == 0
    shutil.rmtree(runs(p)[0])
    path = _cache_path(p)
    db = sqlite3.connect(path)
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    raw = bytearray(path.read_bytes())
    page = 4096
    raw[page:] = _garbage(len(raw) - page)
    path.write_bytes(bytes(raw))
    for suffix in ("-wal", "-shm"):
        Path(f"{path}{suffix}").unlink(missing_ok=True)


def _cache_is_folder(p):
    (p.folder / "cachedir").mkdir()
    return ["--set", "run.cache=cachedir"]


def _out_is_file(p):
    (p.folder / "taken").write_text("a file")
    return ["--out", str(p.folder / "taken")]


def _junit_under_a_file(p):
    (p.folder / "taken").write_text("a file")
    return ["--junit", str(p.folder / "taken" / "junit.xml")]


def _hostile_for_csv(p):
    image(p.folder / "=HYPERLINK(1).png")
    manifest(p, ["=HYPERLINK(1).png,cat"])
    p.cfg["report"]["formats"] = ["json", "csv"]
    p.write()


def _csv_neutralised(p, doc, out):
    text = (runs(p)[0] / "samples.csv").read_text()
    assert "'=HYPERLINK(1).png" in text, text


def _escape_in_class(p):
    p.cfg["model"]["classes"] = ["cat", "dog", "fox\x1b]0;owned\x07"]
    p.write()


def _no_escapes(p, doc, out):
    assert "\x1b" not in out and "\x07" not in out, repr(out)


def _recorded_as_is(p, doc, out):
    assert any("\n" in s["path"] for s in doc["samples"])


def _moved_aside(p, doc, out):
    assert list(_cache_path(p).parent.glob("cache.sqlite.damaged-*"))


WIRING = "needs CLI wiring"

CASES = [
    # ---- images: skipped with the reason, the rest audited
    Case("zero-byte image", _write("data/cat/zero.png", b""), 0, "skipped", ("empty file",), r"cat/zero\.png"),
    Case("text named .png", _write("data/cat/text.png", b"hello"), 0, "skipped", ("not an image",), r"cat/text\.png"),
    Case("non-image file", _write("data/cat/notes.txt", b"hello"), 0, "skipped", ("not an image",), r"cat/notes\.txt"),
    Case("truncated png", lambda p: (cat(p) / "half.png").write_bytes((cat(p) / "cat_0.png").read_bytes()[:300]),
         0, "skipped", ("truncated",), r"cat/half\.png"),
    Case("png with damaged pixel data", _corrupt_png, 0, "skipped", ("corrupt",), r"cat/damaged\.png"),
    Case("truncated jpeg", lambda p: _jpeg(p, "half.jpg", lambda b: b[: len(b) // 2]), 0, "skipped",
         ("truncated",), r"cat/half\.jpg"),
    Case("jpeg with a garbage header", lambda p: _jpeg(p, "photo.jpg", lambda b: b[:2] + _garbage(len(b) - 2)), 0,
         "skipped", ("not an image",), r"cat/photo\.jpg"),
    Case("decompression bomb (warning size)", _write("data/cat/huge.png", png_header(10_000, 10_000)), 0,
         "skipped", ("too large to decode safely", "100000000 pixels"), r"cat/huge\.png"),
    Case("decompression bomb (error size)", _write("data/cat/huger.png", png_header(30_000, 30_000)), 0,
         "skipped", ("too large to decode safely", "900000000 pixels"), r"cat/huger\.png"),
    Case("thin image 3x4000", _thin, 0, "skipped", ("3×4000 px", "data.min_size (8 px)"), r"cat/thin\.png"),
    Case("1x1 image", _tiny, 0, "skipped", ("1×1 px", "data.min_size"), r"cat/dot\.png"),
    Case("7x7 image under min_size", _seven, 0, "skipped", ("7×7 px",), r"cat/seven\.png"),
    Case("7x7 image with data.min_size=4", lambda p: (_seven(p), ["--set", "data.min_size=4"])[1], 0, "ok", (),
         images=N + 1),
    Case("file name not UTF-8", _non_utf8_name, 0, "ok", (r"cat/caf\xe9.png",), images=N + 1),
    Case("file name with newline and escape", _hostile_name, 0, "ok", (), images=N + 1, check=_recorded_as_is),
    Case("symlink to /etc/passwd", _symlink("data/cat/passwd.png", lambda f: Path("/etc/passwd")), 0, "skipped",
         ("outside data.root", "/etc/passwd", "data.allow_outside"), r"cat/passwd\.png"),
    Case("symlink to an image outside", _symlink("data/cat/secret.png", _outside_image), 0, "skipped",
         ("outside data.root", "elsewhere/secret.png"), r"cat/secret\.png"),
    Case("symlink outside, allow_outside", _symlink("data/cat/secret.png", _outside_image, allow=True), 0, "ok",
         (), images=N + 1),
    Case("class folder symlinked outside", _fox_outside, 0, "skipped", ("outside data.root",), r"fox/fox_0\.png",
         images=N - 4),
    Case("symlink inside data.root", _symlink("data/cat/again.png", lambda f: f / "data" / "dog" / "dog_0.png"),
         0, "ok", (), images=N + 1),
    Case("broken symlink", _symlink("data/cat/gone.png", lambda f: f / "nowhere.png"), 0, "skipped",
         ("broken symlink",), r"cat/gone\.png"),
    Case("symlink loop", _symlink("data/cat/loop.png", lambda f: f / "data" / "cat" / "loop.png"), 0, "skipped",
         ("broken symlink",), r"cat/loop\.png"),
    # ---- manifest
    Case("manifest with BOM (Excel)", _manifest_rows(bom=True), 0, "ok", ()),
    Case("manifest header with spaces and capitals", _manifest_rows(header="Path, Label"), 0, "ok", ()),
    Case("manifest row without a label cell", _manifest_rows("data/cat/cat_0.png"), 0, "skipped",
         ("val.csv line 14 has no label",), r"data/cat/cat_0\.png"),
    Case("manifest row with an empty label", _manifest_rows("data/dog/dog_0.png,"), 0, "skipped",
         ("line 14 has no label",), r"data/dog/dog_0\.png"),
    Case("manifest path ../ outside", _manifest_outside(), 0, "skipped", ("outside the manifest's folder",
         "data.allow_outside"), r"\.\./.*-outside\.png"),
    Case("manifest absolute path /etc/passwd", _manifest_rows("/etc/passwd,cat"), 0, "skipped",
         ("outside the manifest's folder", "/etc/passwd"), r"/etc/passwd"),
    Case("manifest ../ with allow_outside", _manifest_outside(allow=True), 0, "ok", (), images=N + 1),
    Case("manifest path to a missing file", _manifest_rows("data/cat/nope.png,cat"), 0, "skipped",
         ("cannot read file", "No such file"), r"data/cat/nope\.png"),
    Case("manifest path with NUL", _manifest_rows("data/cat/a\x00b.png,cat"), 0, "skipped", ("NUL",), r"data/cat/a.b\.png"),
    Case("manifest label not in classes", _manifest_rows("data/cat/cat_0.png,cow"), 2, "error",
         ("val.csv:14", "label 'cow' not in model.classes")),
    Case("manifest without a label column", _manifest_rows(header="path,class"), 2, "error",
         ("val.csv", "missing column(s) label")),
    Case("manifest not UTF-8", _manifest_rows("data/cat/chât.png,cat", encoding="latin-1"), 2, "error",
         ("val.csv", "not UTF-8")),
    Case("manifest with only a header", lambda p: ((p.folder / "val.csv").write_text("path,label\n"),
                                                  p.cfg.update(data={"manifest": "val.csv"}), p.write()) and None,
         2, "error", ("val.csv", "no images found")),
    Case("bbox malformed", _annot("path,label,bbox", "data/cat/cat_0.png,cat,1 2 3"), 0, "warning",
         ("val.csv:2", "bbox must be 'x0 y0 x1 y1'", "ignored")),
    Case("bbox far outside the image", _annot("path,label,bbox", "data/cat/cat_0.png,cat,500 500 900 900"), 0,
         "warning", ("data/cat/cat_0.png", "lies outside the 28×24 image", "ignored")),
    Case("bbox partly outside the image", _annot("path,label,bbox", "data/cat/cat_0.png,cat,-5 2 40 10"), 0,
         "warning", ("data/cat/cat_0.png", "clipped to 0 2 28 10")),
    Case("mask missing", _annot("path,label,mask", "data/cat/cat_0.png,cat,m.png"), 0, "warning",
         ("data/cat/cat_0.png", "m.png not found", "off_object")),
    Case("mask not an image", _annot("path,label,mask", "data/cat/cat_0.png,cat,m.png", _mask_text), 0,
         "warning", ("data/cat/cat_0.png", "not an image")),
    Case("mask of the wrong size", _annot("path,label,mask", "data/cat/cat_0.png,cat,m.png", _mask_wrong_size), 0,
         "warning", ("data/cat/cat_0.png", "mask is 5×5 px but the image is 28×24")),
    Case("mask outside the manifest's folder", _annot("path,label,mask", "data/cat/cat_0.png,cat,/etc/passwd"), 0,
         "warning", ("val.csv:2", "/etc/passwd", "outside the manifest's folder", "mask is ignored")),
    # ---- config
    Case("YAML alias bomb", _bomb_yaml, 2, "error", ("audit.yaml", "expands to more than 100000 values")),
    Case("recursive YAML alias", lambda p: raw_config(p, base_yaml(p) + "loop: &l [*l]\n"), 2, "error",
         ("audit.yaml",)),
    Case("--set value not YAML", _set("run.batch_size=[1"), 2, "error", ("--set 'run.batch_size=[1'",
                                                                          "line 1, column 3")),
    Case("--set with a python tag", _set("prepare=!!python/name:os.system"), 2, "error",
         ("--set", "!!python are not allowed")),
    Case("--set without =", _set("nonsense"), 2, "error", ("--set 'nonsense'", "KEY=VALUE")),
    Case("--set with an empty key", _set("=3"), 2, "error", ("--set '=3'", "KEY=VALUE")),
    Case("--set under a value", _set("run.batch_size.x=1"), 2, "error", ("--set run.batch_size.x",
                                                                          "not a section")),
    Case("--set on an unknown key", _set("run.bacth_size=3"), 2, "error", ("'run.bacth_size'",
                                                                            "did you mean 'batch_size'?")),
    Case("python tag in the config", _python_tag, 2, "error", ("audit.yaml", "line", "!!python are not allowed")),
    Case("impossible waiver date", _waiver("2026-02-30"), 2, "error", ("audit.yaml", "'2026-02-30' is not a valid "
                                                                                     "date", "line")),
    Case("impossible waiver date, quoted", _waiver("'2026-02-30'"), 2, "error", ("audit.yaml", "'waivers.0.expires'")),
    Case("config not UTF-8", _latin1_config, 2, "error", ("audit.yaml", "not UTF-8")),
    Case("classes file not UTF-8", _latin1_classes, 2, "error", ("classes.txt", "not UTF-8")),
    Case("two run: sections", _duplicate_run, 2, "error", ("audit.yaml", "duplicate key 'run'", "first on line")),
    Case("YAML syntax error", _syntax_error, 2, "error", ("audit.yaml", "not valid YAML", "line", "column")),
    Case("near-miss key", _key("run", "bacth_size", 3), 2, "error", ("audit.yaml", "'run.bacth_size'",
                                                                      "did you mean 'batch_size'?")),
    Case("near-miss section", lambda p: raw_config(p, base_yaml(p).replace("explain:", "explian:")), 2, "error",
         ("audit.yaml", "'explian'", "did you mean 'explain'?")),
    Case("empty config", lambda p: raw_config(p, ""), 2, "error", ("audit.yaml", "missing key 'model'")),
    Case("config is a list", lambda p: raw_config(p, "- model\n"), 2, "error", ("audit.yaml", "top level")),
    Case("config over 1 MB", _big_config, 2, "error", ("audit.yaml", "at most 1048576")),
    Case("data.min_size 0", _key("data", "min_size", 0), 2, "error", ("audit.yaml", "'data.min_size'")),
    Case("source key in the config", lambda p: raw_config(p, base_yaml(p) + "source: x\n"), 2, "error",
         ("audit.yaml", "unknown key 'source'")),
    # ---- model
    Case("truncated safetensors", _weights_bytes(lambda b: b[: len(b) // 2]), 2, "error",
         ("w.safetensors", "not a readable safetensors file")),
    Case("garbage safetensors", _weights_bytes(lambda b: _garbage(256)), 2, "error",
         ("w.safetensors", "not a readable safetensors file")),
    Case("empty safetensors", _weights_bytes(lambda b: b""), 2, "error", ("w.safetensors", "safetensors")),
    Case("pickled code in .pt (protocol 4)", _evil_pt, 2, "error", ("evil.pt", "posix.system", "refused")),
    Case("pickled code in .pt (torch.save)", _evil_pt_zip, 2, "error", ("evil.pt", "posix.system", "refused")),
    Case("truncated .pt", _truncated_pt, 2, "error", ("w.pt", "cannot be loaded safely")),
    Case("model NaN on every image", lambda p: model(p, "bad.py:wrapped") or
         ["--set", "model.kwargs={mode: nan_real}"], 2, "error",
         ("none of the 12 images could be audited", "12 × model output is NaN or inf")),
    Case("model NaN even on the dry run", lambda p: model(p, "bad.py:wrapped") or
         ["--set", "model.kwargs={mode: nan_all}"], 2, "error", ("audit.yaml", "NaN or infinite")),
    Case("model output is a tuple", lambda p: model(p, "bad.py:wrapped") or
         ["--set", "model.kwargs={mode: tuple}"], 2, "error", ("audit.yaml", "model output has shape")),
    Case("model raises on one image", lambda p: _white("bad.py:wrapped")(p) or
         ["--set", "model.kwargs={mode: raise_white}"], 0, "skipped",
         ("the model failed on this image", "RuntimeError: this model cannot take a white image"),
         r"cat/white\.png"),
    Case("model NaN on one image", lambda p: _white("bad.py:wrapped")(p) or
         ["--set", "model.kwargs={mode: nan_white}"], 0, "skipped", ("model output is NaN or inf",), r"cat/white\.png"),
    Case("model fails its dry run (input size)", _wrong_input_size, 2, "error",
         ("audit.yaml", "'model.input.size'", "mat1 and mat2")),
    Case("prepare raises", _prepare("boom"), 2, "error", ("audit.yaml", "'prepare'", "RuntimeError: the data "
                                                                                   "server is down")),
    Case("prepare calls sys.exit(0)", _prepare("quits"), 2, "error", ("'prepare'", "SystemExit")),
    Case("factory calls sys.exit(0)", lambda p: model(p, "bad.py:leaves"), 2, "error", ("'model.factory'",
                                                                                       "SystemExit")),
    Case("model file has a syntax error", _net_syntax_error, 2, "error", ("'model.factory'", "cannot import",
                                                                         "SyntaxError")),
    Case("model file exits on import", _net_exits, 2, "error", ("'model.factory'", "SystemExit")),
    # ---- cache
    Case("cache file is garbage", _cache_garbage, 0, "warning", ("cache.sqlite was damaged", "moved to",
                                                                 "rebuilt"), check=_moved_aside),
    Case("cache pages are garbage", _cache_pages, 0, "warning", ("was damaged", "malformed"), check=_moved_aside),
    Case("cache path is a folder", _cache_is_folder, 2, "error", ("run.cache", "cachedir")),
    # ---- outputs and the CLI (the lead wires these)
    Case("--out is a file", _out_is_file, 2, "error", ("taken", "not a folder")),
    Case("--junit under a file", _junit_under_a_file, 2, "error", ("junit.xml", "taken is not a folder")),
    Case("csv cell starting with =", _hostile_for_csv, 0, "ok", (), images=N + 1,
         check=_csv_neutralised),
    Case("rich markup in a class name", lambda p: p.cfg["model"].update(classes=["cat", "dog", "[/x]"]) or p.write()
         and None, 2, "error", ("class folder(s) 'fox' not in model.classes (cat, dog, [/x])",)),
    Case("escape sequence in a class name", _escape_in_class, 2, "error", ("class folder(s) 'fox' not in",), check=_no_escapes),
]


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=False, reason=c.xfail)]
                                               if c.xfail else []) for c in CASES])
def test_bad_input(proj, case: Case):
    extra = case.setup(proj)
    extra = extra if isinstance(extra, list) else []
    r = audit(proj, *extra)
    out = r.output
    assert r.exit_code == case.code, out
    assert "Traceback" not in out, out
    if case.kind == "error":
        assert one_line(out), out
        assert out.startswith("error: "), out
        for s in case.expect:
            assert s in out, out
        assert runs(proj) == [], runs(proj)     # no run folder, finished or half-written
        if case.check:
            case.check(proj, None, out)
        return
    doc = record(proj)
    assert len(doc["samples"]) == case.images, (doc["skipped"], out)
    assert not [p for p in (proj.folder / "reports").iterdir() if p.name.endswith(".partial")]
    if case.kind == "skipped":
        hits = [s for s in doc["skipped"] if re.fullmatch(case.path, s["path"])]
        assert hits, doc["skipped"]
        reason = hits[0]["reason"]
        assert one_line(reason), reason
        for s in case.expect:
            assert s in reason, reason
    elif case.kind == "warning":
        hits = [w for w in doc["warnings"] if all(s in w for s in case.expect)]
        assert hits, doc["warnings"]
        assert one_line(hits[0]), hits[0]
    else:
        paths = [s["path"] for s in doc["samples"]]
        for s in case.expect:
            assert s in paths, paths
    if case.check:
        case.check(proj, doc, out)


def test_a_crash_is_one_line_without_a_traceback(proj, monkeypatch):
    """A bug inside the pipeline (not a bad input) still exits 2 with one line."""
    import auditor.explain.engine as engine

    def broken(*args, **kwargs):
        raise KeyError("simulated bug")
    monkeypatch.setattr(engine, "process_batch", broken)
    r = audit(proj)
    assert r.exit_code == 2 and one_line(r.output) and "Traceback" not in r.output, r.output
    assert "KeyError" in r.output and runs(proj) == []


def test_the_matrix_is_large_and_distinct():
    assert len(CASES) >= 60 and len({c.id for c in CASES}) == len(CASES)


def test_a_damaged_cache_gives_the_same_results(proj):
    first = audit(proj)
    assert first.exit_code == 0, first.output
    before = record(proj)
    shutil.rmtree(runs(proj)[0])
    _cache_path(proj).write_bytes(_garbage(4096))
    for suffix in ("-wal", "-shm"):
        Path(f"{_cache_path(proj)}{suffix}").unlink(missing_ok=True)
    second = audit(proj)
    assert second.exit_code == 0, second.output
    after = record(proj)
    assert [s["prediction"] for s in after["samples"]] == [s["prediction"] for s in before["samples"]]
    assert any("damaged" in w for w in after["warnings"])


# ---------------------------------------------------------------------------------- preflight


def test_check_outputs(tmp_path):
    from auditor.inputs.preflight import check_outputs
    check_outputs(tmp_path / "new" / "reports", tmp_path / "junit.xml")   # creatable: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match=r"is not a folder"):
        check_outputs(tmp_path / "file")
    with pytest.raises(ConfigError, match=r"cannot create .*: .*file is not a folder"):
        check_outputs(tmp_path / "file" / "reports")
    check_outputs(tmp_path, tmp_path / "missing" / "j.xml")                # its folder can be created: fine
    with pytest.raises(ConfigError, match=r"--junit .*file/j.xml: .*file is not a folder"):
        check_outputs(tmp_path, tmp_path / "file" / "j.xml")
    with pytest.raises(ConfigError, match=r"--junit .*: is a folder"):
        check_outputs(tmp_path, tmp_path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_check_outputs_read_only(tmp_path):
    from auditor.inputs.preflight import check_outputs
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(ConfigError, match=r"cannot write in"):
            check_outputs(ro)
        with pytest.raises(ConfigError, match=r"--junit"):
            check_outputs(tmp_path, ro / "junit.xml")
    finally:
        ro.chmod(0o755)


def test_clean_stale_partials(tmp_path):
    from auditor.inputs.preflight import OWNER, clean_stale_partials, mark_partial
    old, young, live, dead, other = (tmp_path / f".2026010{k}-000000.partial" for k in range(1, 6))
    for d in (old, young, live, dead, other):
        d.mkdir()
        (d / "findings.json").write_text("{}")
    past = time.time() - 7 * 3600
    for path in (old, old / "findings.json"):
        os.utime(path, (past, past))
    mark_partial(live)                                            # this process: alive
    (dead / OWNER).write_text(f"{os.uname().nodename} 999999999\n")  # no such process
    (other / OWNER).write_text("another-host 1\n")                # another machine, young: kept
    (tmp_path / "20260101-000000").mkdir()                        # a finished run: never touched
    (tmp_path / ".cache").mkdir()
    removed = clean_stale_partials(tmp_path)
    assert sorted(removed) == sorted([old.name, dead.name])
    assert young.is_dir() and live.is_dir() and other.is_dir() and (tmp_path / "20260101-000000").is_dir()
    assert clean_stale_partials(tmp_path, older_than_s=0) == sorted([young.name, other.name])
    assert clean_stale_partials(tmp_path / "missing") == []


# ---------------------------------------------------------------------------------- text


@pytest.mark.parametrize("value, expected", [
    ("=1+1", "'=1+1"), ("+SUM(A1)", "'+SUM(A1)"), ("-2", "'-2"), ("@cmd", "'@cmd"), ("\tx", "'\tx"),
    ("\rx", "'\rx"), ("cat/a.png", "cat/a.png"), ("", ""), (0.5, 0.5), (None, None), (-3, -3),
])
def test_csv_cell(value, expected):
    from auditor.outputs.text import csv_cell
    assert csv_cell(value) == expected


@pytest.mark.parametrize("text, expected", [
    ("plain", "plain"), ("red \x1b[31mtext\x1b[0m", "red text"), ("title\x1b]0;owned\x07 here", "title here"),
    ("a\nb\rc", "a\\nb\\rc"), ("bell\x07", "bell\\x07"), ("tab\there", "tab here"),
    ("bidi \u202eevil", "bidi evil"), (os.fsdecode(b"caf\xe9"), "caf\\xe9"), ("c1 \x9b31m", "c1 "),
    ("lone \x1b", "lone "), ("naïve ✓", "naïve ✓"),
])
def test_terminal(text, expected):
    from auditor.outputs.text import terminal
    assert terminal(text) == expected


# ---------------------------------------------------------------------------------- property


def test_load_config_either_loads_or_says_one_line(tmp_path):
    """Generated configs and --set values: load_config returns a config or raises a one-line
    ConfigError, never anything else."""
    pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    base = {"model": {"factory": "net.py:make", "classes": ["a", "b"], "input": {"size": [16, 16]}},
            "data": {"root": "data"}}
    keys = st.sampled_from(["model", "data", "run", "explain", "report", "trust", "waivers", "rules",
                            "intervention", "prepare", "run.batch_size", "run.device", "data.limit",
                            "data.min_size", "data.allow_outside", "model.input.size", "model.classes",
                            "report.fail_on", "report.formats", "explain.methods", "waivers.0.expires",
                            "run.cache", "model.kwargs", "x", "run.x.y", "", "..", "model.input"])
    scalars = st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.floats(allow_nan=True),
                        st.text(max_size=12))
    values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
    yaml_texts = st.sampled_from(["[1", "{a: 1", "!!python/name:os.system", "&a [*a]", "a: b: c", "'", "\t",
                                  "2026-02-30", "- - -", "*x", "!!binary AAAA", "0x1F", "1e400", "~", "\x00",
                                  "{a: 1, a: 2}", "%YAML 1.1\n---\n1", "---\n1\n---\n2"])
    raw_sets = st.lists(st.tuples(keys, st.one_of(values.map(lambda v: json.dumps(v, default=str)),
                                                  yaml_texts, st.text(max_size=20))), max_size=3)
    documents = st.one_of(values, st.just(base), st.builds(lambda extra: {**base, **extra},
                                                           st.dictionaries(keys, values, max_size=3)))
    path = tmp_path / "audit.yaml"

    @settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
    @given(doc=documents, sets=raw_sets, raw=st.one_of(st.none(), yaml_texts, st.binary(max_size=40)))
    def check(doc, sets, raw):
        if raw is None:
            path.write_text(yaml.safe_dump(doc, allow_unicode=True))
        else:
            path.write_bytes(raw if isinstance(raw, bytes) else raw.encode())
        try:
            load_config(path, [f"{k}={v}" for k, v in sets])
        except ConfigError as e:
            assert str(e) and one_line(str(e)), repr(str(e))

    check()
