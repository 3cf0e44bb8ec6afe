"""The Ray engine: same results as the local engine, a worker that dies mid-run, out-of-memory
batches inside workers, and a cluster that cannot be reached."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
import time

import pytest
from typer.testing import CliRunner

from auditor.cli import app
from conftest import NET_PY, report_folder, stable

ray = pytest.importorskip("ray")
runner = CliRunner()


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray for the module: starting it costs more than the audits themselves."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield
    ray.shutdown()


def run(project, *args):
    """Run the CLI in this process; returns (findings.json, samples.csv rows)."""
    r = runner.invoke(app, ["run", str(project.path), "--quiet", "--set", "run.cache=false", *args])
    assert r.exit_code in (0, 1), r.output
    folder = report_folder(project, r.output)  # Ray Data's logger may write after that line
    with (folder / "samples.csv").open() as f:
        rows = list(csv.DictReader(f))
    return json.loads((folder / "findings.json").read_text()), rows


def use_factory(project, name: str, code: str, hook: str) -> None:
    """A model file in the test project: the tiny net with ``code``'s forward pre-hook ``hook``
    on it, loaded by path in every worker."""
    build = f"\ndef build(num_classes=3):\n    model = make(num_classes)\n" \
            f"    model.register_forward_pre_hook({hook})\n    return model\n"
    (project.folder / f"{name}.py").write_text(NET_PY + code + build)
    project.cfg["model"]["factory"] = f"{name}.py:build"
    project.write()


def test_ray_engine_matches_local(project, local_ray):
    local, local_rows = run(project)
    distributed, rows = run(project, "--set", "run.engine=ray")
    assert stable(local) == stable(distributed)
    assert rows == local_rows


def test_ray_workers_share_the_cache_through_shards(project, local_ray):
    """Workers write shards beside the cache; the driver absorbs them, so a rerun computes nothing."""
    first, _ = run(project, "--set", "run.engine=ray", "--set", "run.cache=true")
    second, _ = run(project, "--set", "run.engine=ray", "--set", "run.cache=true")
    assert first["run"]["computed"]["predictions"] == 12 and second["run"]["computed"] == {}
    assert stable(first) == stable(second)
    shards = project.folder / "reports" / ".cache" / "cache.sqlite.shards"
    assert shards.is_dir() and not list(shards.iterdir())


# The first real batch any Ray worker predicts kills that worker outright, as an OOM kill or a
# lost node would: no exception, no cleanup. O_EXCL makes the marker's creation atomic, so exactly
# one process dies, once; the driver (this pytest process) and build_model's one-row dry run are
# left alone.
DIES_ONCE = '''
import os

def _die_once(module, args):
    if os.getpid() == {driver} or args[0].shape[0] < 2:
        return
    try:
        fd = os.open({marker!r}, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        return
    os.write(fd, str(os.getpid()).encode())
    os.close(fd)
    os._exit(1)
'''


def test_worker_that_dies_mid_run_has_its_batch_retried(project, local_ray):
    local, local_rows = run(project)
    marker = project.folder / "died"
    use_factory(project, "dies_once", DIES_ONCE.format(driver=os.getpid(), marker=str(marker)), "_die_once")
    distributed, rows = run(project, "--set", "run.engine=ray")

    dead = int(marker.read_text())
    assert dead != os.getpid()  # a worker really died...
    with pytest.raises(ProcessLookupError):
        os.kill(dead, 0)
    # ...and its batch was redone elsewhere: every image once, nothing lost, nothing counted twice.
    assert sorted(r["path"] for r in rows) == sorted(r["path"] for r in local_rows)
    assert len(rows) == len({r["path"] for r in rows}) == 12
    assert distributed["run"]["computed"]["predictions"] == 12
    assert stable(local) == stable(distributed)
    assert rows == local_rows


# Gradient passes over more than two images "run out of memory", as on a small GPU; prediction
# (no gradients) is unaffected. Each worker logs the batch sizes it was asked to explain.
OOM_ABOVE_TWO = '''
import os

def _oom(module, args):
    x = args[0]
    if x.requires_grad:
        with open({log!r}, "a") as f:
            f.write(f"{{os.getpid()}} {{len(x)}}\\n")
        if len(x) > 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
'''


def test_out_of_memory_batch_is_split_inside_ray_workers(project, local_ray):
    local, _ = run(project)
    log = project.folder / "grad_batches.log"
    use_factory(project, "oom", OOM_ABOVE_TWO.format(log=str(log)), "_oom")
    distributed, _ = run(project, "--set", "run.engine=ray")

    calls = [tuple(map(int, line.split())) for line in log.read_text().splitlines()]
    in_workers = [n for pid, n in calls if pid != os.getpid()]
    assert max(in_workers) > 2 and min(in_workers) <= 2  # failed whole, then succeeded in halves
    assert distributed["metrics"]["explained"] == 12 and not distributed["warnings"]
    assert stable(local) == stable(distributed)


def test_unreachable_cluster_is_a_one_line_error(project):
    # A fresh process: Ray must not already be running in it, and the exit code is the real one.
    # Port 1 on localhost refuses at once; without the probe, ray.init would retry for minutes.
    project.cfg["run"].update(engine="ray", ray_address="127.0.0.1:1")
    project.write()
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-m", "auditor.cli", "run", str(project.path), "--quiet"],
                       capture_output=True, text=True, timeout=120)
    assert time.perf_counter() - t0 < 60
    assert r.returncode == 2, r.stdout + r.stderr
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, r.stderr
    assert str(project.path) in lines[0] and "run.ray_address" in lines[0] and "127.0.0.1:1" in lines[0]
    assert "Traceback" not in r.stderr
