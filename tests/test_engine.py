"""The batch engine: cache reuse, corruption detection, resume after kill -9 (the Ray engine: test_ray.py)."""
from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from auditor.cli import app
from conftest import report_folder, stable

runner = CliRunner()


def run(project, *args):
    r = runner.invoke(app, ["run", str(project.path), "--quiet", *args])
    assert r.exit_code in (0, 1), r.output
    return json.loads((report_folder(project, r.output) / "findings.json").read_text())


def test_rerun_computes_nothing_again(project):
    first = run(project)
    assert first["run"]["computed"]["predictions"] == 12 and first["run"]["computed"]["saliency"] > 0
    second = run(project, "--set", "rules={corner_border: {band: 0.2}}")  # rules-only change
    assert second["run"]["computed"] == {}
    assert stable(first)["samples"][0]["sha256"] == stable(second)["samples"][0]["sha256"]


def test_corrupted_cache_entry_is_detected_and_recomputed(project):
    first = run(project)
    db = sqlite3.connect(project.folder / "reports" / ".cache" / "cache.sqlite")
    with db:
        db.execute("UPDATE blobs SET data = X'00112233' WHERE rowid = (SELECT min(rowid) FROM blobs)")
    db.close()
    second = run(project)
    assert sum(second["run"]["computed"].values()) == 1
    assert any("corrupted cache" in w for w in second["warnings"])
    assert stable(first) == stable(second)


def test_has_many_skips_damaged_heatmaps_without_decompressing(tmp_path):
    """The engine asks which heatmaps are cached with has_many: a damaged entry counts as missing
    (and is dropped, so it is recomputed), as with get."""
    import numpy as np

    from auditor.explain.store import Store
    store = Store(tmp_path / "c.sqlite")
    store.put_many({"a": np.ones((4, 4), np.float16), "b": np.zeros((4, 4), np.float16)})
    with store.db:
        store.db.execute("UPDATE blobs SET data = X'00112233' WHERE key = 'b'")
    assert store.has_many(["a", "b", "c"]) == {"a"} and store.corrupt == 1
    assert store.get("b") is None and store.has_many([f"k{i}" for i in range(1200)] + ["a"]) == {"a"}


SLOW_NET = '''
import time
from net import make as _make

def make(num_classes=3):
    model = _make(num_classes)
    model.register_forward_hook(lambda *a: time.sleep(0.15))  # a slow model, so the run can be killed midway
    return model
'''


def test_killed_run_resumes_to_identical_findings(project, tmp_path):
    (project.folder / "slow.py").write_text(SLOW_NET)
    project.cfg["model"]["factory"] = "slow.py:make"
    project.cfg["run"]["batch_size"] = 2
    project.write()
    env = {**os.environ, "PYTHONPATH": str(project.folder)}
    cmd = [sys.executable, "-m", "auditor.cli", "run", str(project.path), "--quiet"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    cache = project.folder / "reports" / ".cache" / "cache.sqlite"
    deadline = time.time() + 60
    committed = 0
    while time.time() < deadline and proc.poll() is None:
        if cache.exists():
            try:
                committed = sqlite3.connect(cache).execute("SELECT count(*) FROM blobs").fetchone()[0]
            except sqlite3.Error:
                committed = 0
            if committed >= 4:
                break
        time.sleep(0.05)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    runs = [p for p in (project.folder / "reports").iterdir() if not p.name.startswith(".")]
    assert runs == [], "a killed run must not leave a folder that looks complete"

    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    doc = json.loads((report_folder(project, resumed.stdout) / "findings.json").read_text())
    assert doc["run"]["computed"].get("predictions", 0) < 12  # the killed run's batches were reused

    project.cfg["run"]["cache"] = False
    project.write()
    fresh = subprocess.run(cmd, env=env, capture_output=True, text=True)
    doc_fresh = json.loads((report_folder(project, fresh.stdout) / "findings.json").read_text())
    assert stable(doc) == stable(doc_fresh)


def test_out_of_memory_batch_is_split_and_retried(project, monkeypatch):
    import dataclasses

    import auditor.explain.methods  # noqa: F401  (registers the methods when this test runs alone)
    from auditor.registry import METHODS
    entry = METHODS.get("saliency")
    calls = []

    def flaky(model, x, target, **params):
        calls.append(len(x))
        if len(x) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return entry.fn(model, x, target, **params)

    monkeypatch.setitem(METHODS._entries, "saliency", dataclasses.replace(entry, fn=flaky))
    project.cfg["run"]["cache"] = False
    project.write()
    doc = run(project)
    assert max(calls) > 2 and min(calls) <= 2
    assert doc["metrics"]["explained"] == 12 and not doc["warnings"]


def test_split_on_oom_halves_until_each_part_fits_and_joins_in_order():
    from auditor.explain.engine import split_on_oom
    calls = []

    def run(part):
        calls.append(list(part))
        if len(part) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return [v * 10 for v in part]

    assert split_on_oom(run, list(range(7)), lambda parts: sum(parts, [])) == [v * 10 for v in range(7)]
    assert max(len(c) for c in calls if len(c) <= 2) <= 2 and calls[0] == list(range(7))
    with pytest.raises(RuntimeError, match="other"):   # any other error is not retried
        split_on_oom(lambda part: (_ for _ in ()).throw(RuntimeError("other")), [1, 2, 3], list)


def test_device_auto_takes_cuda_only_when_present(monkeypatch):
    import pytest
    import torch

    from auditor.inputs.config import ConfigError
    from auditor.inputs.model import pick_device
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto").type == "cpu" and pick_device("cpu").type == "cpu"
    with pytest.raises(ConfigError, match="run.device is 'cuda' but no CUDA device"):
        pick_device("cuda")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert pick_device("auto").type == "cuda"
