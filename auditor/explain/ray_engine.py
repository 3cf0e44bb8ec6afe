"""The Ray engine: the same ``process_batch`` as the local engine, run by a pool of actors.

Each actor loads the model once (one GPU each when there are GPUs), decodes its batches from
the images' paths, looks results up in the run's cache and writes what it computes into its
own shard file beside it (``<cache>.shards/``); the driver gathers only the small records and
absorbs the shards into the cache when the pool is done (and, first, any shards that an
interrupted run left behind, so a killed Ray run resumes too). Ray retries the tasks of an
actor that dies (``max_restarts``/``max_task_retries``), and records are merged by sample id,
so a retried batch is counted once and a lost one is an error, never a silently smaller audit.
With the run folder on a filesystem every node mounts, workers on other machines share it.
"""
from __future__ import annotations

import pickle
import socket
import uuid
from pathlib import Path

import numpy as np

from auditor.inputs.config import ConfigError
from auditor.inputs.data import ImageDataset, collate
from auditor.explain.engine import Context, Records, check_usable, merge, process_batch
from auditor.explain.store import ShardedStore, Store


def shard_folder(cache: Path) -> Path:
    return cache.with_name(cache.name + ".shards")


class AuditWorker:
    def __init__(self, cfg, refs, methods, support, model_key, cache: str):
        from auditor.inputs.data import load_classes
        from auditor.inputs.model import build_model, pick_device, target_layer
        import auditor.explain.methods  # noqa: F401  (registers the methods in this process)

        device = pick_device(cfg.run.device)
        model = build_model(cfg, len(load_classes(cfg)), device)
        from auditor.explain.layers import default_layer
        layer = (target_layer(model, cfg.model.target_layer, cfg.source) if cfg.model.target_layer
                 else default_layer(model, (cfg.model.input.channels, *cfg.model.input.size), device))
        self.ctx = Context(cfg, model, device, layer, methods, support, refs, model_key)
        self.dataset = ImageDataset(refs, cfg.model.input, cfg.data.min_size)
        shards = shard_folder(Path(cache))
        shards.mkdir(exist_ok=True)
        self.store = ShardedStore(Path(cache), shards / f"{uuid.uuid4().hex}.sqlite")

    def __call__(self, batch: dict) -> dict:
        ids = [int(i) for i in batch["id"]]
        rec = process_batch(self.ctx, collate([self.dataset[i] for i in ids]), self.store)
        payload = pickle.dumps((ids, rec, dict(self.ctx.disabled)))
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


def absorb_shards(store: Store) -> None:
    folder = shard_folder(store.path)
    for shard in sorted(folder.glob("*.sqlite")) if folder.is_dir() else []:
        store.absorb(shard)


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
    absorb_shards(store)  # what an interrupted Ray run computed is cached: reuse it
    gpus = 1 if ctx.device.type == "cuda" else 0
    ds = ray.data.from_items([{"id": i} for i in range(len(ctx.refs))])
    results = ds.map_batches(
        AuditWorker, batch_size=cfg.run.batch_size, batch_format="numpy",
        fn_constructor_kwargs=dict(cfg=cfg, refs=ctx.refs, methods=ctx.methods,
                                   support=ctx.support, model_key=ctx.model_key, cache=str(store.path)),
        compute=ActorPoolStrategy(size=cfg.run.ray_workers), num_gpus=gpus, num_cpus=1,
        max_restarts=2, max_task_retries=2)
    total = Records(heatmaps={m: {} for m in ctx.methods}, contrast={m: {} for m in ctx.methods})
    if getattr(store, "notice", None):
        total.warnings.append(store.notice)
    done: set[int] = set()
    for row in results.iter_rows():
        ids, rec, disabled = pickle.loads(row["payload"])
        if done.intersection(ids):
            continue  # a retried batch that already arrived: never count twice
        done.update(ids)
        merge(total, rec)
        ctx.disabled.update(disabled)
    absorb_shards(store)
    if len(done) != len(ctx.refs):
        raise RuntimeError(f"the Ray engine returned results for {len(done)} of {len(ctx.refs)} images")
    check_usable(ctx, total)
    return total

