"""The trust gate of an older commit against the working tree's, alternating in one process on one
audit's evidence (a random-init Hugging Face ResNet-50, random 224-px images, as bench/phases.py):
under a changing load, only runs side by side compare. Prints each run's seconds, verdicts and parts,
the per-pair ratios and whether the verdicts agree.

    git show 6ee1e99:auditor/judge/trust.py > /tmp/old_trust.py
    OMP_WAIT_POLICY=PASSIVE HF_HUB_OFFLINE=1 python bench/gate_ab.py /tmp/old_trust.py --pairs 3
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import phases  # noqa: E402  (sets the environment and the repository's path)

import numpy as np  # noqa: E402
import torch  # noqa: E402

import auditor.audit  # noqa: E402
from auditor.judge import trust as new  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("old", type=Path, help="an older auditor/judge/trust.py")
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--per-class", type=int, default=6, help="images per class (3 classes): 6 gives 16 test images")
    args = ap.parse_args()
    spec = importlib.util.spec_from_file_location("old_trust", args.old)
    old = importlib.util.module_from_spec(spec)
    sys.modules["old_trust"] = old
    spec.loader.exec_module(old)
    torch.set_num_threads(1)
    times: dict[str, list[float]] = {"old": [], "new": []}
    verdicts: dict[str, dict] = {}

    def gates(ev, methods, layer, cfg, store, model_key, layer_info=None):
        out = None
        for k in range(args.pairs):  # alternate which goes first
            for name, mod in (("old", old), ("new", new))[:: 1 if k % 2 == 0 else -1]:
                t0 = time.perf_counter()
                res = mod.trust_gate(ev, methods, layer, cfg.trust, cfg.run.seed)
                times[name].append(time.perf_counter() - t0)
                verdicts[name] = {m: (t.get("randomisation"), t.get("deletion"), t.get("fill"),
                                      t.get("deletion_images"), t["randomisation_spearman"][t["decisive_step"]])
                                  for m, t in res.items()}
                parts = {m: t.get("timing") for m, t in res.items()}
                print(name, round(times[name][-1], 1), json.dumps(verdicts[name]), json.dumps(parts), flush=True)
                out = res if name == "new" else out
        return out

    auditor.audit.cached_trust = gates
    with tempfile.TemporaryDirectory() as tmp:
        path = phases.write_project(Path(tmp), phases.build("resnet50"), args.per_class, False, True, True)
        phases.audit_once(path, "resnet50")
    ratio = [n / o for n, o in zip(times["new"], times["old"])]
    print("old", [round(t, 1) for t in times["old"]], "new", [round(t, 1) for t in times["new"]])
    print("new/old per pair", [round(r, 3) for r in ratio], "median", round(float(np.median(ratio)), 3))
    print("same verdicts:", verdicts["old"] == verdicts["new"])


if __name__ == "__main__":
    main()
