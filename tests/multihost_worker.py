"""One process of tests/test_partitioning.py's multi-host check, run as a script.

Evaluates the packaged MiniLM on real RTE dev examples and builds its teacher cache on a mesh
whose devices can alternate between processes along the batch axis (`--interleave`), the way a
TPU pod's ring order may lay them out. Prints one JSON line: the mesh's device owners, the dev
metrics, the logits and the teacher cache's folder (written by process 0 under --cache_dir).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _args():
    p = argparse.ArgumentParser()
    p.add_argument("--glue_dir", required=True)
    p.add_argument("--cache_dir", required=True)
    p.add_argument("--examples", type=int, default=100)
    p.add_argument("--coordinator_address")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    p.add_argument("--interleave", action="store_true")
    return p.parse_args()


def _devices(interleave: bool):
    """Every device; with interleave, p0d0, p1d0, p0d1, p1d1, ... (no process owns a block)."""
    import jax

    devices = jax.devices()
    if not interleave:
        return devices
    groups = [[d for d in devices if d.process_index == i] for i in range(jax.process_count())]
    return [d for column in zip(*groups) for d in column]


def main():
    args = _args()
    sys.path.insert(0, str(REPO))
    import jax
    import numpy as np
    from flax import nnx

    from pkd_jax import checkpoints, data, evaluate, partitioning, steps, teacher_cache

    partitioning.initialize_distributed(coordinator_address=args.coordinator_address,
                                        num_processes=args.num_processes, process_id=args.process_id)
    mesh = partitioning.make_mesh(devices=_devices(args.interleave))
    graphdef, params = nnx.split(checkpoints.load_pretrained("minilm-l6", num_labels=2), nnx.Param)
    params = partitioning.place_state(params, mesh)
    cache_dir = Path(args.cache_dir)
    ds = data.load_split("rte", data.dev_split("rte"), glue_dir=args.glue_dir).select(range(args.examples))
    # Each process its own tokenizer cache: no two writers of one entry.
    tok = data.tokenize(ds, checkpoints.load_tokenizer("minilm-l6"), 64,
                        cache_dir=cache_dir / f"tokenized-{jax.process_index()}")
    # 32 rows: 4 per device, and the last of 4 batches is partly filler (weight 0).
    logits = evaluate.predict(jax.jit(steps.make_logits_fn(graphdef)), params, tok, mesh, 32)
    cache = teacher_cache.build_or_load(graphdef, params, tok, (2, 4), mesh=mesh, batch_size=32,
                                        cache_dir=cache_dir / "teacher", features_dtype=np.float32,
                                        progress=False)
    print(json.dumps({"owners": [d.process_index for d in mesh.devices.flat],
                      "metrics": evaluate.scores("rte", logits, tok.labels),
                      "logits": logits.tolist(), "cache": str(cache.path)}), flush=True)


if __name__ == "__main__":
    main()
