"""The Ray engine: the same ``process_batch`` as the local engine, run by a pool of actors.

Each actor loads the model once (one GPU each when there are GPUs), decodes its batches from
the images' paths, and returns small records plus the new cache entries; the driver writes
those into the store and gathers the records. Ray retries the tasks of an actor that dies
(``max_restarts``/``max_task_retries``), and records are merged by sample id, so a retried
batch is counted once and a lost one is an error, never a silently smaller audit.
"""
from __future__ import annotations

import pickle
import socket

import numpy as np

from auditor.config import ConfigError
from auditor.data import ImageDataset, collate
from auditor.engine import Context, Records, merge, process_batch
from auditor.store import Store


class MemoryStore:
    """The store interface for a worker: nothing known up front, new entries kept for the driver."""

    def __init__(self):
        self.items: dict = {}

    def get_many(self, keys):
        return {}

    def put_many(self, items):
        self.items.update(items)


class AuditWorker:
    def __init__(self, cfg, refs, methods, support, model_key):
        from auditor.data import load_classes
        from auditor.model import build_model, pick_device, target_layer
        import auditor.methods  # noqa: F401  (registers the methods in this process)

        device = pick_device(cfg.run.device)
        model = build_model(cfg, len(load_classes(cfg)), device)
        layer = target_layer(model, cfg.model.target_layer, cfg.source)
        self.ctx = Context(cfg, model, device, layer, methods, support, refs, model_key)
        self.dataset = ImageDataset(refs, cfg.model.input)

    def __call__(self, batch: dict) -> dict:
        ids = [int(i) for i in batch["id"]]
        store = MemoryStore()
        rec = process_batch(self.ctx, collate([self.dataset[i] for i in ids]), store)
        payload = pickle.dumps((ids, rec, store.items, dict(self.ctx.disabled)))
        return {"payload": np.array([payload], dtype=object)}


# ray.init on an address where nothing answers retries for many minutes; a plain TCP connect
# says in at most this many seconds that nobody listens there.
PROBE_TIMEOUT_S = 5


def probe(address: str) -> None:
    """Raise OSError when nothing accepts a TCP connection at ``[ray://]host:port``."""
    host, _, port = address.split("://")[-1].rpartition(":")
    if not host or not port.isdigit():
        return  # "auto", "local" or a form Ray parses itself: let ray.init judge it
    socket.create_connection((host.strip("[]"), int(port)), timeout=PROBE_TIMEOUT_S).close()


def run_ray(ctx: Context, store: Store, quiet: bool = False) -> Records:
    try:
        import ray
    except ImportError:
        raise ConfigError("run.engine is 'ray' but Ray is not installed: pip install 'ray[data]'") from None
    cfg = ctx.cfg
    if not ray.is_initialized():
        try:
            if cfg.run.ray_address:
                probe(cfg.run.ray_address)
            ray.init(address=cfg.run.ray_address, include_dashboard=False, log_to_driver=False,
                     configure_logging=False, num_cpus=None if cfg.run.ray_address else cfg.run.ray_workers)
        except Exception as e:
            why = (str(e).strip().splitlines() or [""])[0]  # Ray's messages run to many lines
            raise ConfigError(f"{cfg.source}: 'run.ray_address': cannot start or reach Ray "
                              f"({cfg.run.ray_address or 'local'}): {type(e).__name__}: {why}") from None
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().enable_progress_bars = not quiet
    gpus = 1 if ctx.device.type == "cuda" else 0
    ds = ray.data.from_items([{"id": i} for i in range(len(ctx.refs))])
    results = ds.map_batches(
        AuditWorker, batch_size=cfg.run.batch_size, batch_format="numpy",
        fn_constructor_kwargs=dict(cfg=cfg, refs=ctx.refs, methods=ctx.methods,
                                   support=ctx.support, model_key=ctx.model_key),
        compute=ActorPoolStrategy(size=cfg.run.ray_workers), num_gpus=gpus, num_cpus=1,
        max_restarts=2, max_task_retries=2)
    total = Records(heatmaps={m: {} for m in ctx.methods}, contrast={m: {} for m in ctx.methods})
    done: set[int] = set()
    for row in results.iter_rows():
        ids, rec, items, disabled = pickle.loads(row["payload"])
        if done.intersection(ids):
            continue  # a retried batch that already arrived: never count twice
        done.update(ids)
        store.put_many(items)
        merge(total, rec)
        ctx.disabled.update(disabled)
    if len(done) != len(ctx.refs):
        raise RuntimeError(f"the Ray engine returned results for {len(done)} of {len(ctx.refs)} images")
    return total

