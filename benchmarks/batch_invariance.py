"""Is a pair's score the same whatever it is batched with? Bit differences, and the invariant mode's cost.

    python benchmarks/batch_invariance.py bits --experts all-tiny [--invariant]
    python benchmarks/batch_invariance.py cost --profile tiny --images 32 --request-sizes 1 3 8
    python benchmarks/batch_invariance.py cost --profile random-full --images 4 --batch-size 4 --request-sizes 4 1

`bits`: requests of 2 to 7 pairs (diversity needs two images per request) scored alone, all pooled in one
call and in random shuffled mixtures with strangers' requests (one rewarder, `max_batch_size` 8, so pooled
requests straddle forward passes), on the PIL path and on the raw-tensor path; prints, per expert (and
extra, and the total), how many pairs' values differ in any bit from the same pair scored alone.
`--invariant` sets `batch_invariant: true`.

`cost`: images/s of `score_checked` on random 512x512 uint8 tensors (the service's raw path, prepared
beforehand as the service's pool does) in requests of each `--request-sizes`, about `--images` images in
all: "pooled", all requests in one call (a busy service's micro-batch), and "alone", one call per request
(an idle service); with the mode off and on (`--batch-size` is max_batch_size, the mode's pass size),
interleaved rounds, medians; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from t2i_reward.rewarders import create_rewarder  # noqa: E402
from t2i_reward.rewarders.invariance import mixed_requests, tiny_experts  # noqa: E402

NO_TINY = {"imagereward": None, "aesthetic": None, "mlp": None}
ALL_TINY = tiny_experts(geneval_size=128)
PROMPTS = ['a sign that says "open"', "a red apple on a wooden table", 'a poster reading "hello world" in blue',
           "two dogs playing in the snow", "a watercolor lighthouse at dusk, with a very long description of the sea"]


def make_requests(n: int, seed: int) -> list[tuple]:
    """n requests of 2 to 7 pairs: (prompts, uint8 (size, H, W, 3), metadata); image sizes vary between requests."""
    return mixed_requests(n, seed, range(2, 8), [(96, 128), (160, 160), (200, 152)], PROMPTS)


def flatten(results) -> list[dict[str, float]]:
    """Per pair: every component, extra and the total."""
    rows = []
    for res in results:
        for im in res.images:
            rows.append({**{f"c:{k}": v for k, v in im.components.items()}, **{f"x:{k}": v for k, v in (im.extras or {}).items()},
                         "total": im.total})
    return rows


def score(r, reqs, path: str):
    from PIL import Image

    checked = []
    for prompts, t, meta in reqs:
        if path == "tensor":
            checked.append(r.check_tensor_request(prompts, t, metadata=meta))
        else:
            checked.append(r.check_request(prompts, [Image.fromarray(a.numpy()) for a in t], metadata=meta))
    return flatten(r.score_checked(checked))


def bits(args) -> None:
    experts = ALL_TINY if args.experts == "all-tiny" else {**NO_TINY, **{n: ALL_TINY[n] for n in args.experts.split(",")}}
    kw = dict(profile="tiny", device=args.device, calibration=None, experts=experts)
    if args.invariant:
        kw["batch_invariant"] = True
    r = create_rewarder(max_batch_size=8, **kw)
    mine, strangers = make_requests(args.requests, 1), make_requests(2 * args.requests, 2)
    at = lambda reqs: [0, *np.cumsum([len(q[0]) for q in reqs])]  # noqa: E731  each request's first row
    rng = random.Random(5)
    report = {}
    for path in ("pil", "tensor"):
        alone = [score(r, [q], path) for q in mine]
        diffs: dict[str, list[int]] = {}

        def compare(got_by_req, label):
            n = 0
            for i, rows in got_by_req.items():
                for a, b in zip(alone[i], rows):
                    for k in a:
                        same = (a[k] is None and b[k] is None) or (a[k] is not None and b[k] is not None
                                                                   and np.float32(a[k]).tobytes() == np.float32(b[k]).tobytes())
                        diffs.setdefault(k, [0, 0])[1] += 1
                        if not same:
                            diffs[k][0] += 1
                            n += 1
            return n

        rows, s = score(r, mine, path), at(mine)  # all pooled in one call
        compare({i: rows[s[i]: s[i + 1]] for i in range(len(mine))}, "pooled")
        for _ in range(args.mixes):  # shuffled among strangers
            pick = rng.sample(range(len(mine)), rng.randint(1, len(mine)))
            pool = [("m", i) for i in pick] + [("s", j) for j in rng.sample(range(len(strangers)), rng.randint(1, len(strangers)))]
            rng.shuffle(pool)
            reqs = [mine[i] if k == "m" else strangers[i] for k, i in pool]
            rows, s = score(r, reqs, path), at(reqs)
            compare({i: rows[s[p]: s[p + 1]] for p, (k, i) in enumerate(pool) if k == "m"}, "mixed")
        report[path] = {k: f"{d}/{n}" for k, (d, n) in diffs.items()}
    print(json.dumps(report, indent=1))


def cost(args) -> None:
    out = {"profile": args.profile, "device": args.device, "images": args.images, "batch_size": args.batch_size,
           "torch_threads": torch.get_num_threads(), "sizes": {}}
    rs = {mode: create_rewarder(profile=args.profile, device=args.device, max_batch_size=args.batch_size, batch_invariant=mode)
          for mode in (False, True)}
    g = np.random.default_rng(0)
    for size in args.request_sizes:
        n = max(1, args.images // size)
        reqs = [(PROMPTS[:1] * size, torch.from_numpy(g.integers(0, 256, (size, 512, 512, 3), dtype=np.uint8))) for _ in range(n)]
        checked = {m: [r.check_tensor_request(p, t) for p, t in reqs] for m, r in rs.items()}
        for m in (False, True):  # warm-up
            rs[m].score_checked(checked[m][:1])
        for how in ("pooled", "alone"):
            times = {False: [], True: []}
            for _ in range(args.rounds):
                for m in (False, True):
                    t = time.perf_counter()
                    if how == "pooled":
                        rs[m].score_checked(checked[m])
                    else:
                        for c in checked[m]:
                            rs[m].score_checked([c])
                    times[m].append(time.perf_counter() - t)
            ips = {m: n * size / statistics.median(v) for m, v in times.items()}
            out["sizes"][f"{size} {how}"] = row = {"images_per_s_off": round(ips[False], 3), "images_per_s_on": round(ips[True], 3),
                                                   "cost": f"{100 * (1 - ips[True] / ips[False]):.1f}%"}
            print(size, how, json.dumps(row), file=sys.stderr)
    print(json.dumps(out, indent=1))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="mode", required=True)
    b = sub.add_parser("bits")
    b.add_argument("--experts", default="all-tiny", help="'all-tiny' or a comma-separated list of ALL_TINY's names")
    b.add_argument("--requests", type=int, default=6)
    b.add_argument("--mixes", type=int, default=4)
    b.add_argument("--invariant", action="store_true")
    c = sub.add_parser("cost")
    c.add_argument("--profile", default="tiny")
    c.add_argument("--images", type=int, default=32)
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--request-sizes", type=int, nargs="+", default=[1, 3, 8])
    c.add_argument("--rounds", type=int, default=3)
    for s in (b, c):
        s.add_argument("--device", default="cpu", help="cpu, cuda, ... (on CUDA the mode also turns deterministic algorithms on, process-wide)")
    a = p.parse_args()
    bits(a) if a.mode == "bits" else cost(a)


if __name__ == "__main__":
    main()
