"""Fuzz every operation of the reward service from its own OpenAPI schema (schemathesis + hypothesis).

    python benchmarks/fuzz.py --examples 200 --seed 1 --out fuzz.json                 # a tiny server in-process
    python benchmarks/fuzz.py --url http://127.0.0.1:8000 --api-key KEY --examples 500 --out fuzz.json

Per operation, `--examples` cases are split between schemathesis's positive mode (bodies the schema
allows) and negative mode (bodies it forbids), plus `--auth-examples` cases whose auth headers are
fuzzed too (all other cases carry the valid key, so the fuzzing gets past auth). Bodies are made
realistic where random data would only ever be refused:
- JSON `images`: base64 strings / data URLs of real images of any mode, format and size, sometimes
  truncated, corrupted, a decompression bomb, or not base64 (the `t2i-image-b64` format below);
- multipart `images`: the same image files as raw bytes (format `binary`);
- `/reward/gradient`: safetensors files with an `images` tensor of random shape, dtype and values
  (NaN, inf, out of range) and fuzzed `prompts` / `weights` metadata, or broken safetensors.
Every response is checked with CHECKS; a request that gets no answer within `--timeout` is a hang.
The report prints, per operation: cases, answers by status class, hangs and distinct failures, each with
a curl command that reproduces it (bodies that are not short text go to files next to `--out`).

The pytest run (tests/test_fuzz.py) imports the strategies and CHECKS from here.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import io
import json
import shlex
import struct
import sys
import tempfile
import threading
import time
import zlib
from collections import Counter
from pathlib import Path

import numpy as np
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from PIL import Image
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# The checks every response gets: no 5xx, a documented status code, the documented content type, and a
# body valid against the documented response schema.
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
KEY = "fuzz-key"
OPEN_PATHS = {"/healthz", "/readyz", "/metrics"}

# ---------------------------------------------------------------------------------------------------------
# Strategies for the bodies random data would not reach


def _png_bomb(width: int, height: int) -> bytes:
    """A valid PNG header declaring a huge image, with almost no pixel data behind it."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"]
MODES = ["RGB", "RGBA", "L", "LA", "P", "1", "CMYK", "I;16", "I", "F"]
EXPERTS = ["imagereward", "aesthetic", "mlp"]  # the tiny profile's


def faults(*names: str) -> st.SearchStrategy:
    """None (a valid value) half of the time, else one of `names`: one fault at a time, so the valid path
    and each refusal are all reached."""
    return st.one_of(st.none(), st.sampled_from(names))


@st.composite
def image_files(draw) -> bytes:
    """An encoded image: any mode, format and size (extreme aspect ratios included); or one fault."""
    fault = draw(faults("truncated", "flipped", "bomb", "junk"))
    if fault == "bomb":
        return _png_bomb(draw(st.integers(1, 100_000)), draw(st.integers(1, 100_000)))
    if fault == "junk":
        return draw(st.binary(min_size=1, max_size=64))
    w, h = draw(st.sampled_from([(1, 1), (64, 48), (7, 300), (2000, 1), (1, 3000), (33, 33)]) | st.tuples(st.integers(1, 96), st.integers(1, 96)))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    im = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).convert(draw(st.sampled_from(MODES)))
    buf = io.BytesIO()
    try:
        im.save(buf, format=draw(st.sampled_from(FORMATS)))
    except (OSError, ValueError, KeyError):  # this mode cannot be written in this format
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
    data = buf.getvalue()
    if fault == "truncated":
        return data[: draw(st.integers(1, max(1, len(data) - 1)))]
    if fault == "flipped":
        i = draw(st.integers(0, len(data) - 1))
        return data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    return data


@st.composite
def image_strings(draw) -> str:
    """An image as JSON carries it: base64 or a data URL; or one encoding fault."""
    b64 = base64.b64encode(draw(image_files())).decode()
    how = draw(st.sampled_from(["b64", "data", "wrapped"]))
    fault = draw(faults("urlsafe", "no-base64", "text"))
    return {
        "b64": b64,
        "data": f"data:image/png;base64,{b64}",
        "wrapped": "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)),
        "urlsafe": b64.replace("+", "-").replace("/", "_").rstrip("="),
        "no-base64": f"data:image/png,{b64}",
        "text": draw(st.text(max_size=20)),
    }[fault or how]


def weights_values() -> st.SearchStrategy[dict]:
    return st.dictionaries(st.sampled_from(EXPERTS), st.floats(-10, 10), max_size=3)


DTYPES = ["float32", "float16", "bfloat16", "float64"]
# JSON the json module refuses with other errors than JSONDecodeError: an integer of over 4,300 digits
# (ValueError) and deep nesting (RecursionError)
BIG_INT_JSON = "1" * 5000
DEEP_JSON = "[" * 100_000 + "]" * 100_000
SHAPES = [(1, 3, 32, 32), (2, 3, 17, 45), (3, 3, 1, 1), (1, 3, 1, 512), (1, 3, 224, 224)]


@st.composite
def safetensors_bodies(draw) -> bytes:
    """A /reward/gradient body: safetensors with an `images` tensor (B, 3, H, W) in [0, 1] and `prompts` /
    `weights` metadata; or one fault in the shape, dtype, values, metadata or the file itself."""
    import torch
    from safetensors.torch import save

    fault = draw(faults("shape", "dtype", "values", "prompts", "weights", "name", "extra", "truncate", "header", "random"))
    shape = draw(st.sampled_from(SHAPES))
    if fault == "shape":
        shape = draw(st.sampled_from([(0, 3, 8, 8), (1, 3, 0, 8), (3, 16, 16), (1, 1, 16, 16), (1, 4, 16, 16), (1, 1, 3, 8, 8), (1, 3, 1, 4096)]))
    dtype = getattr(torch, draw(st.sampled_from(["uint8", "int64", "bool", "int8"] if fault == "dtype" else DTYPES)))
    x = torch.rand(shape, generator=torch.Generator().manual_seed(draw(st.integers(0, 2**31))))
    if fault == "values":
        x = draw(st.sampled_from([x.masked_fill(x > 0.5, float("nan")), x.masked_fill(x > 0.5, float("inf")), -x, x * 1e6]))
    n = shape[0] if len(shape) == 4 else 1
    prompts = draw(st.sampled_from([json.dumps(["a red apple"] * n), json.dumps("a red apple")]))
    if fault == "prompts":
        prompts = draw(st.sampled_from([None, "not json", json.dumps(["a cat"] * (n + 1)), json.dumps([1] * n), '""', json.dumps("x" * 5000), "[]",
                                        DEEP_JSON, "[" + BIG_INT_JSON + "]"]) | st.text(max_size=20))
    weights = draw(st.none() | weights_values().map(json.dumps))
    if fault == "weights":
        weights = draw(st.sampled_from([json.dumps({"nope": 1.0}), "[1]", json.dumps({"mlp": "x"}), "{", '{"aesthetic": NaN}', '{"mlp": 1e999}',
                                        DEEP_JSON, '{"mlp": ' + BIG_INT_JSON + "}"]))
    meta = {k: v for k, v in (("prompts", prompts), ("weights", weights)) if v is not None}
    tensors = {"pixels" if fault == "name" else "images": x.to(dtype).contiguous()}
    if fault == "extra":  # anything beside `images` is refused
        tensors["other"] = torch.zeros(draw(st.integers(0, 4)))
    body = save(tensors, metadata=meta)
    if fault == "truncate":
        return body[: draw(st.integers(0, len(body) - 1))]
    if fault == "header":
        header = draw(st.sampled_from([b"[]", b"{", b'{"images": 1}', b'{"__metadata__": {"prompts": 5}}', b'{"__metadata__": []}',
                                       b'{"images": {"dtype": "F32", "shape": [1, 3, 2, 2], "data_offsets": [0, 999999]}}',
                                       b'{"images": {"dtype": "F32", "shape": [1, 3, 99999, 99999], "data_offsets": [0, 16]}}']))
        return struct.pack("<Q", draw(st.sampled_from([len(header), 2**63, 2**40]))) + header
    if fault == "random":
        return draw(st.binary(max_size=64))
    return body


def register_strategies() -> None:
    """Make schemathesis generate the bodies above (global registrations; idempotent)."""
    schemathesis.openapi.format("t2i-image-b64", image_strings())
    schemathesis.openapi.format("binary", image_files())  # multipart files (the gradient body has its own)
    schemathesis.openapi.format("t2i-weights-json", weights_values().map(json.dumps) | st.sampled_from([DEEP_JSON, '{"mlp": ' + BIG_INT_JSON + "}"]))
    schemathesis.openapi.media_type("application/octet-stream", safetensors_bodies())


def _resolve(raw: dict, schema: dict) -> dict:
    return raw["components"]["schemas"][schema["$ref"].rsplit("/", 1)[1]] if "$ref" in schema else schema


def prepare_schema(raw: dict, max_images: int = 4) -> dict:
    """The service's schema, narrowed for generation so that positive cases are mostly accepted: image
    fields get the formats above, weights name real experts, jobs a base model that exists and no
    pretrain folder. Negative cases still violate it. The response schemas, which the checks use, are
    left exactly as the service documents them."""
    raw = json.loads(json.dumps(raw))
    content = raw["paths"]["/reward"]["post"]["requestBody"]["content"]
    body = _resolve(raw, content["application/json"]["schema"])["properties"]
    body["images"].update(maxItems=max_images, minItems=1)
    body["images"]["items"]["format"] = "t2i-image-b64"
    body["prompt"]["minLength"] = 1
    body["weights"] = {"anyOf": [{"type": "object", "properties": {e: {"type": "number"} for e in EXPERTS}, "additionalProperties": False}, {"type": "null"}]}
    form = _resolve(raw, content["multipart/form-data"]["schema"])["properties"]
    form["images"].update(maxItems=max_images, minItems=1)
    form["weights"]["format"] = "t2i-weights-json"
    form["prompt"]["minLength"] = 1
    spec = raw["components"]["schemas"]["JobSpec"]["properties"]
    spec["base_model"] = {"enum": ["tiny", "stable-diffusion-v1-5/stable-diffusion-v1-5", None]}
    spec["pretrain_data"] = {"type": "null"}
    raw["components"]["schemas"]["JobSpec"]["required"] = ["prompts"]
    return raw


def integer_fields(raw: dict) -> dict[str, set[str]]:
    """Per JSON-body path, the top-level fields the schema types as integers (or lists of them)."""
    out = {}
    for path, item in raw["paths"].items():
        schema = item.get("post", {}).get("requestBody", {}).get("content", {}).get("application/json", {}).get("schema")
        if schema:
            props = _resolve(raw, schema).get("properties", {})
            out[path] = {k for k, v in props.items() if "integer" in json.dumps(v) and "number" not in json.dumps(v)}
    return out


def strict_ints(case, fields: dict[str, set[str]]) -> None:
    """Positive cases: integral floats (4.0) in integer fields sent as ints. JSON Schema counts 4.0 as an
    integer and schemathesis generates it; the service's strict ints refuse it (422), which would hide
    the rest of the body from the fuzzing."""
    names = fields.get(case.path)
    if not names or not isinstance(case.body, dict) or case.meta is None or not case.meta.generation.mode.is_positive:
        return
    fix = lambda v: int(v) if isinstance(v, float) and v.is_integer() else [fix(x) for x in v] if isinstance(v, list) else v  # noqa: E731
    case.body = {k: fix(v) if k in names else v for k, v in case.body.items()}


def use_known_job(case, job_ids: list[str]) -> None:
    """In half of the positive cases with a job id, an id of a job that exists (chosen from the generated
    id, so the run stays reproducible), so GET/cancel/artifacts also answer about real jobs."""
    job_id = (case.path_parameters or {}).get("job_id")
    if job_id and job_ids and case.meta is not None and case.meta.generation.mode.is_positive:
        h = zlib.crc32(str(job_id).encode())
        if h % 2 == 0:
            case.path_parameters["job_id"] = job_ids[(h // 2) % len(job_ids)]


def submit_jobs(url: str, key: str, n: int = 2, keep_one_queued: bool = True) -> list[str]:
    """Jobs to fuzz the job routes with: the first stays queued (unless told otherwise: a worker would run
    it), the others are cancelled at once."""
    ids = []
    for i in range(n):
        r = requests.post(f"{url}/jobs", json={"prompts": ["a red apple"], "steps": 1, "base_model": "tiny", "seed": i, "resolution": 32,
                                                "num_inference_steps": 2, "refl_step_range": [0, 2]},
                          headers={"x-api-key": key}, timeout=30)
        r.raise_for_status()
        ids.append(r.json()["id"])
        if i or not keep_one_queued:
            requests.post(f"{url}/jobs/{ids[-1]}/cancel", headers={"x-api-key": key}, timeout=30).raise_for_status()
    return ids


def schema_from(raw: dict):
    """A schemathesis schema from the service's OpenAPI document, ready to generate cases; its
    `integer_fields` attribute is for `strict_ints`."""
    register_strategies()
    raw = prepare_schema(raw)
    schema = schemathesis.openapi.from_dict(raw)
    schema.integer_fields = integer_fields(raw)
    return schema


def load_schema(url: str, timeout: float = 30):
    """The schemathesis schema of the service at `url`."""
    return schema_from(requests.get(f"{url}/openapi.json", timeout=timeout).json())


def authorize(case, key: str = KEY) -> None:
    """Send the valid key, and no generated Authorization header (auth is fuzzed in its own cases)."""
    case.headers = {k: v for k, v in (case.headers or {}).items() if k.lower() not in ("authorization", "x-api-key")}
    case.headers["x-api-key"] = key


# ---------------------------------------------------------------------------------------------------------
# Reproducers


def curl(request: requests.PreparedRequest, files_dir: Path, name: str, key: str) -> str:
    """A curl command replaying `request` byte for byte (a binary or long body goes to a file)."""
    parts = ["curl", "-sS", "-X", request.method, request.url]
    skip = {"content-length", "user-agent", "accept-encoding", "accept", "connection", "x-schemathesis-testcaseid"}
    for k, v in request.headers.items():
        if k.lower() not in skip:
            parts += ["-H", f"{k}: {v}"]
    body = request.body.encode() if isinstance(request.body, str) else request.body
    if body:
        try:
            text = body.decode("utf-8")
            inline = len(text) <= 600 and text.isprintable()
        except UnicodeDecodeError:
            inline = False
        if inline:
            parts += ["--data-binary", text]
        else:
            files_dir.mkdir(parents=True, exist_ok=True)
            (files_dir / name).write_bytes(body)
            parts += ["--data-binary", f"@{files_dir / name}"]
    return " ".join(shlex.quote(p) for p in parts).replace(shlex.quote(key), "$KEY") if key else " ".join(map(shlex.quote, parts))


# ---------------------------------------------------------------------------------------------------------
# The run


def fuzz_operation(op, url: str, examples: int, auth_examples: int, seed_: int, timeout: float, key: str, files_dir: Path,
                   job_ids: list[str], ints: dict[str, set[str]]) -> dict:
    """Run one operation's cases; never raises on a bad answer (every case is recorded instead)."""
    label = f"{op.method.upper()} {op.path}"
    stats = {"cases": 0, "2xx": 0, "4xx": 0, "5xx": 0, "other": 0, "hangs": 0, "status": Counter(), "failures": {}}
    session = requests.Session()

    def record(kind: str, message: str, request, status) -> None:
        sig = (kind, status, message.strip().splitlines()[0][:200] if message.strip() else "")
        f = stats["failures"].get(sig)
        size = len(request.body or b"") if request is not None else 0
        if f is None or size < f["_size"]:  # keep the smallest reproducer of each distinct failure
            name = f"{label.replace(' ', '_').replace('/', '_').strip('_')}-{len(stats['failures'])}.bin"
            f = {"kind": kind, "status": status, "message": message.strip()[:1500], "count": (f or {}).get("count", 0),
                 "curl": curl(request, files_dir, name, key) if request is not None else None, "_size": size}
            stats["failures"][sig] = f
        f["count"] += 1

    def run(case, fuzz_auth: bool) -> None:
        if not fuzz_auth or op.path in OPEN_PATHS:
            authorize(case, key)
        use_known_job(case, job_ids)
        strict_ints(case, ints)
        stats["cases"] += 1
        try:
            response = case.call(base_url=url, session=session, timeout=timeout)
        except requests.Timeout:
            stats["hangs"] += 1
            prepared = requests.Request(**{k: v for k, v in case.as_transport_kwargs(base_url=url).items()
                                           if k in ("method", "url", "headers", "data", "json", "files", "params")}).prepare()
            record("hang", f"no answer within {timeout:g} s", prepared, None)
            return
        except requests.RequestException as e:
            stats["other"] += 1
            record("connection", f"{type(e).__name__}: {e}", None, None)
            return
        code = response.status_code
        stats["status"][code] += 1
        stats[f"{code // 100}xx" if code // 100 in (2, 4, 5) else "other"] += 1
        try:
            case.validate_response(response, checks=CHECKS, headers=dict(response.request.headers))
        except FailureGroup as group:
            for failure in group.exceptions:
                record(failure.title, failure.message, response.request, code)
        except AssertionError as failure:
            record(getattr(failure, "title", type(failure).__name__), str(failure), response.request, code)

    plan = [(mode, examples // 2, False) for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)]
    if op.path not in OPEN_PATHS and auth_examples:
        plan.append((schemathesis.GenerationMode.POSITIVE, auth_examples, True))
    for mode, n, fuzz_auth in plan:
        if n <= 0:
            continue
        strategy = op.as_strategy(generation_mode=mode)

        @given(strategy)
        @settings(max_examples=n, database=None, deadline=None, phases=[Phase.explicit, Phase.generate],
                  suppress_health_check=list(HealthCheck))
        @seed(seed_)
        def test(case):
            run(case, fuzz_auth)

        try:
            test()
        except Unsatisfiable:  # nothing to generate: no negative variant of an operation without inputs
            pass
        except Exception as e:  # a bug of this harness or of schemathesis: report it, carry on
            record("harness-error", f"{type(e).__name__}: {e}", None, None)
    session.close()
    stats["status"] = {str(k): v for k, v in sorted(stats["status"].items())}
    stats["failures"] = [{k: v for k, v in f.items() if k != "_size"} for f in stats["failures"].values()]
    return stats


def fuzz(url: str, examples: int = 200, seed_: int = 0, timeout: float = 20.0, key: str = KEY,
         auth_examples: int = 20, files_dir: Path | None = None, only: str | None = None, own_server: bool = True) -> dict:
    schema = load_schema(url)
    job_ids = submit_jobs(url, key, keep_one_queued=own_server)
    files_dir = files_dir or Path(tempfile.mkdtemp(prefix="fuzz-repro-"))
    results = {}
    for result in schema.get_all_operations():
        op = result.ok()
        label = f"{op.method.upper()} {op.path}"
        if only and only not in label:
            continue
        t = time.perf_counter()
        results[label] = fuzz_operation(op, url, examples, auth_examples, seed_, timeout, key, files_dir, job_ids,
                                        schema.integer_fields)
        results[label]["seconds"] = round(time.perf_counter() - t, 1)
        print(f"  {label}: {results[label]['cases']} cases in {results[label]['seconds']} s", file=sys.stderr, flush=True)
    try:
        alive = requests.get(f"{url}/readyz", timeout=timeout).status_code
    except requests.RequestException as e:
        alive = repr(e)
    return {"url": url, "examples": examples, "seed": seed_, "timeout_s": timeout, "readyz_after": alive,
            "repro_files": str(files_dir), "operations": results}


@contextlib.contextmanager
def tiny_server(redis_url: str, key: str = KEY, **settings):
    """The service with the tiny profile, served by uvicorn in a thread of this process; yields its URL.
    Its Redis db must be the script's own: it is emptied before and after."""
    import redis
    import uvicorn
    from t2i_reward.rewarders.client import RewardClient
    from t2i_reward.service.app import create_app
    from t2i_reward.service.settings import Settings

    root = Path(tempfile.mkdtemp(prefix="t2i-fuzz-"))
    db = redis.Redis.from_url(redis_url)
    db.flushdb()
    app = create_app(Settings(profile="tiny", api_keys=[key], redis_url=redis_url, jobs_dir=root / "jobs",
                              models_dir=root / "models", data_dir=root / "data", **settings))
    with contextlib.closing(__import__("socket").socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    try:
        with RewardClient(url) as client:
            client.wait_ready(600)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)
        db.flushdb()


def print_report(summary: dict) -> None:
    print(f"{'operation':42} {'cases':>6} {'2xx':>5} {'4xx':>5} {'5xx':>5} {'hangs':>5} {'fails':>5}  statuses")
    for label, s in summary["operations"].items():
        print(f"{label:42} {s['cases']:6} {s['2xx']:5} {s['4xx']:5} {s['5xx']:5} {s['hangs']:5} {len(s['failures']):5}  {s['status']}")
    print(f"/readyz after the run: {summary['readyz_after']}")
    for label, s in summary["operations"].items():
        for f in s["failures"]:
            print(f"\n[{label}] {f['kind']} (status {f['status']}, {f['count']}x)\n  {f['message'][:600]}".replace("\n", "\n  "))
            if f["curl"]:
                print(f"  repro: {f['curl'][:1500]}")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running service; default: a tiny server in this process")
    p.add_argument("--api-key", default=KEY, help="its API key (the in-process server gets this one)")
    p.add_argument("--examples", type=int, default=200, help="cases per operation (half positive, half negative)")
    p.add_argument("--auth-examples", type=int, default=20, help="extra cases per protected operation with fuzzed auth headers")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=20.0, help="seconds without an answer that count as a hang")
    p.add_argument("--only", help="only operations whose 'METHOD /path' contains this")
    p.add_argument("--redis-url", default="redis://127.0.0.1:6379/12", help="the in-process server's Redis (emptied)")
    p.add_argument("--out", type=Path, help="write the JSON summary here (reproducer bodies next to it)")
    args = p.parse_args()
    files_dir = args.out.with_suffix(".repro") if args.out else None
    with (contextlib.nullcontext(args.url) if args.url else tiny_server(args.redis_url, args.api_key)) as url:
        summary = fuzz(url, args.examples, args.seed, args.timeout, args.api_key, args.auth_examples, files_dir, args.only,
                       own_server=not args.url)
    print_report(summary)
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    return 1 if any(s["failures"] or s["hangs"] for s in summary["operations"].values()) else 0


if __name__ == "__main__":
    sys.exit(main())
