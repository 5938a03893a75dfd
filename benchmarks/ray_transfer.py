"""What sending a micro-batch's prepared pixels to a pool costs on Ray: one actor call with a float32
(B, 3, 224, 224) torch tensor against the same pixels as a numpy array (what the ingress sends since
`to_wire`, service/pooled.py), on a local Ray cluster of its own. The actor does what a pool does with them
(`PreparedPixels`: a numpy array is copied once out of the read-only object store).

    python benchmarks/ray_transfer.py --images 32 --calls 8

Prints one JSON object: the median milliseconds per call of each, after one warm-up call.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import numpy as np
import ray
import torch


@ray.remote(num_cpus=0.1)
class Pool:
    def take(self, pixels) -> float:
        t = torch.from_numpy(np.array(pixels)) if isinstance(pixels, np.ndarray) else pixels
        return float(t[0, 0, 0, 0])


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--images", type=int, default=32)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--calls", type=int, default=8)
    args = ap.parse_args()
    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    try:
        pool = Pool.remote()
        ray.get(pool.take.remote(np.zeros((1, 3, 2, 2), np.float32)))
        pixels = torch.rand(args.images, 3, args.size, args.size)
        out = {"images": args.images, "size": args.size, "machine": f"{os.cpu_count()} cores", "ray": ray.__version__}
        for name, send in (("torch_ms", lambda: pixels), ("numpy_ms", lambda: pixels.numpy())):
            times = []
            for _ in range(args.calls):
                t = time.perf_counter()
                ray.get(pool.take.remote(send()))
                times.append(time.perf_counter() - t)
            out[name] = 1000 * statistics.median(times)
        print(json.dumps(out))
    finally:
        ray.shutdown()


if __name__ == "__main__":
    main()
