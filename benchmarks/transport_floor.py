"""What moving a raw-tensor body costs on this machine without the service: the floor under its HTTP overhead.

    python benchmarks/transport_floor.py --pairs 16 --requests 40

Sends the body `pairs_throughput.py overhead` sends (safetensors, uint8 (pairs, 512, 512, 3)) with httpx to
an endpoint that only reads it (`await request.body()`, answering two bytes), served the way `t2i-reward
serve` serves (uvicorn, in its own process, with the service's allocator setting), and the same bytes
over plain loopback TCP to a process that only receives them into a buffer. Medians after a pause before
each call, as in the overhead benchmark; per request and per image. What the service's overhead adds on
top of the first is its own (checking, the preprocessing pool's hand-offs, the batcher, encoding the answer).
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.model_thread import random_images  # noqa: E402
from benchmarks.pairs_throughput import PROMPTS, free_port, post_tensors, tensor_body  # noqa: E402


def body_only_app():
    """An ASGI app with one route that reads the request body and answers 'ok'."""
    from starlette.applications import Starlette
    from starlette.responses import Response
    from starlette.routing import Route
    from t2i_reward.service.memory import keep_freed_memory
    from t2i_reward.service.settings import Settings

    keep_freed_memory(Settings().keep_freed_mb)  # as the service sets glibc: a body costs a copy, not page faults

    async def read_body(request):
        await request.body()
        return Response(b"ok")

    async def ready(request):
        return Response(b"ok")

    return Starlette(routes=[Route("/reward", read_body, methods=["POST"]), Route("/healthz", ready)])


def serve(port: int) -> None:
    import uvicorn

    uvicorn.run(body_only_app(), host="127.0.0.1", port=port, log_level="warning")  # as `t2i-reward serve` calls it


def receive_forever(port_queue, size: int) -> None:
    """Plain TCP: receive `size` bytes into one buffer, answer one byte, again, until the peer closes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port_queue.put(s.getsockname()[1])
        conn, _ = s.accept()
        buf = memoryview(bytearray(size))
        while True:
            got = 0
            while got < size:
                n = conn.recv_into(buf[got:], size - got)
                if not n:
                    return
                got += n
            conn.sendall(b"k")


def timed(call, requests: int, pause_s: float) -> float:
    call()  # warm-up
    times = []
    for _ in range(requests):
        time.sleep(pause_s)
        t = time.perf_counter()
        call()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--requests", type=int, default=40)
    ap.add_argument("--pause-ms", type=float, default=50)
    ap.add_argument("--serve", type=int, help=argparse.SUPPRESS)  # internal: run the body-only server on this port
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve)

    body = tensor_body(random_images(args.pairs, args.size), [PROMPTS[i % len(PROMPTS)] for i in range(args.pairs)])
    pause = args.pause_ms / 1e3
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", str(port)])
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
            for _ in range(300):
                try:
                    http.get("/healthz").raise_for_status()
                    break
                except httpx.TransportError:
                    time.sleep(0.1)
            http_s = timed(lambda: post_tensors(http, body), args.requests, pause)  # the overhead benchmark's request
    finally:
        proc.terminate()
        proc.wait(30)

    ports = mp.Queue()
    receiver = mp.Process(target=receive_forever, args=(ports, len(body)), daemon=True)
    receiver.start()
    with socket.create_connection(("127.0.0.1", ports.get(timeout=30))) as conn:
        def send_and_wait():
            conn.sendall(body)
            conn.recv(1)

        tcp_s = timed(send_and_wait, args.requests, pause)
    receiver.join(30)

    per_image = lambda s: round(1e3 * s / args.pairs, 3)  # noqa: E731
    print(json.dumps({"pairs_per_request": args.pairs, "size": args.size, "body_bytes": len(body), "requests": args.requests,
                      "http_body_only": {"ms": round(1e3 * http_s, 2), "ms_per_image": per_image(http_s)},
                      "plain_tcp": {"ms": round(1e3 * tcp_s, 2), "ms_per_image": per_image(tcp_s)}}, indent=1))


if __name__ == "__main__":
    main()
