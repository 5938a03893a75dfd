"""The hostile probe of issue 29, as a benchmark: cheap requests that cost the server far more than their
size, against `t2i-reward serve --profile tiny` in a child process. Prints and writes (--out) per attack:
the server's answer, its peak RSS above the idle RSS, the CPU-s it burned, and `/healthz`'s worst latency
while the attack ran.

    python benchmarks/attack.py --out /tmp/attack.json                          # this checkout's server
    python benchmarks/attack.py --exe /path/to/other/.venv/bin/t2i-reward ...   # another build (before/after)

The payloads (also used by tests/test_attack.py) are built here: flat images that encode to a few bytes and
decode to 40 MP (lossless WebP, JPEG 2000), a progressive JPEG with its last scan repeated, a safetensors
body of a million empty tensors, JSON of a 5,000-digit integer or deep nesting, a huge header, idle and
stalled connections. The server is killed past --rss-cap-mb (the attack then counts as "killed"): the
probe's OOM cases are reproduced without taking the machine down.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import resource
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx
from PIL import Image

KEY = "attack-key"
OTHER_KEY = "another-key"  # another client's
BIG = (7000, 5714)  # 39,998,000 pixels: under the default 40 MP limit


# ---- payloads

def flat_image(fmt: str, size=BIG, mode: str = "RGB", **save) -> bytes:
    """A flat image of `size` in `fmt`: lossless WebP, JPEG 2000, PNG... encode it in a few hundred bytes."""
    buf = io.BytesIO()
    Image.new(mode, size, 128 if mode == "L" else (120, 60, 200)).save(buf, format=fmt, **save)
    return buf.getvalue()


def scan_bomb_jpeg(size=(2048, 2048), scans: int = 200) -> bytes:
    """A progressive greyscale JPEG whose last scan (an AC band: a few bytes of end-of-band runs on a flat
    image) is repeated until it holds `scans` scans. libjpeg decodes every one, a pass over all blocks each."""
    data = flat_image("JPEG", size, "L", progressive=True, quality=90)
    sos = [m.start() for m in re.finditer(b"\xff\xda", data)]
    last = data[sos[-1] : data.rindex(b"\xff\xd9")]
    return data[: data.rindex(b"\xff\xd9")] + last * (scans - len(sos)) + b"\xff\xd9"


def many_tensors(n: int = 1_000_000) -> bytes:
    """A safetensors body with `images` and `n` zero-size tensors beside it (~50 bytes of header each)."""
    import torch
    from safetensors.torch import save

    real = save({"images": torch.rand(1, 3, 32, 32)}, metadata={"prompts": '"a cat"'})
    header = json.loads(real[8 : 8 + int.from_bytes(real[:8], "little")])
    header.update({f"t{i}": {"dtype": "U8", "shape": [0], "data_offsets": [0, 0]} for i in range(n)})
    # tensors' data follows the header; `images` is the only one with bytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw + real[8 + int.from_bytes(real[:8], "little"):]


def tensor_body(meta: dict[str, str], shape=(1, 3, 32, 32)) -> bytes:
    import torch
    from safetensors.torch import save

    return save({"images": torch.rand(*shape)}, metadata=meta)


BIG_INT = "1" * 5000  # json.loads: ValueError (over 4,300 digits)
DEEP = "[" * 100_000 + "]" * 100_000  # json.loads: RecursionError


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


# ---- the server and the probes

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`exe serve --profile tiny` in a child process, with its RSS and CPU time read from /proc."""

    def __init__(self, exe: str, env: dict[str, str], nofile: int | None = None, rss_cap_mb: int = 6000):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
        limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
        self.proc = subprocess.Popen([exe, "serve", "--profile", "tiny", "--port", str(self.port)],
                                     env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT, preexec_fn=limit)
        self.rss_cap = rss_cap_mb << 20
        self.killed = False
        end = time.time() + 300
        while time.time() < end:
            try:
                if httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None:
                raise RuntimeError(Path(self.log.name).read_text()[-3000:])
            time.sleep(0.3)
        raise RuntimeError("server never became ready")

    def rss(self) -> int:
        try:
            return int(Path(f"/proc/{self.proc.pid}/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, IndexError):
            return 0

    def cpu_s(self) -> float:
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError):
            return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def measure(server: Server, name: str, attack, settle_s: float = 1.0) -> dict:
    """Run `attack()` (returns a short outcome) while one thread polls /healthz and another RSS."""
    stop = threading.Event()
    worst, peak, failures = [0.0], [server.rss()], [0]
    idle_rss, cpu0 = server.rss(), server.cpu_s()
    cpu = [cpu0]

    def poll_health():
        with httpx.Client(timeout=120) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    c.get(f"{server.url}/healthz")
                except httpx.HTTPError:
                    failures[0] += 1
                    time.sleep(0.2)
                worst[0] = max(worst[0], time.perf_counter() - t)
                time.sleep(0.05)

    def poll_rss():
        while not stop.is_set():
            cpu[0] = max(cpu[0], server.cpu_s())  # the last reading before a kill
            peak[0] = max(peak[0], server.rss())
            if peak[0] > server.rss_cap and server.proc.poll() is None:
                server.proc.kill()
                server.killed = True
            time.sleep(0.02)

    threads = [threading.Thread(target=poll_health, daemon=True), threading.Thread(target=poll_rss, daemon=True)]
    for t in threads:
        t.start()
    t0 = time.perf_counter()
    try:
        outcome = attack()
    except Exception as e:
        outcome = f"{type(e).__name__}: {str(e)[:120]}"
    elapsed = time.perf_counter() - t0
    time.sleep(settle_s)
    stop.set()
    for t in threads:
        t.join(150)
    result = {"attack": name, "outcome": "server killed past the RSS cap" if server.killed else outcome,
              "seconds": round(elapsed, 2), "cpu_s": round(max(cpu[0], server.cpu_s()) - cpu0, 2),
              "peak_rss_over_idle_mib": round((peak[0] - idle_rss) / 2**20), "healthz_worst_s": round(worst[0], 3),
              "healthz_failures": failures[0]}
    print(json.dumps(result), flush=True)
    return result


def post(server: Server, path: str, timeout: float = 300, **kw) -> str:
    r = httpx.post(f"{server.url}{path}", headers={"X-API-Key": KEY, **kw.pop("headers", {})}, timeout=timeout, **kw)
    return f"{r.status_code} {r.text[:100]}"


def reward_json(images: list[bytes]) -> dict:
    return {"prompt": "a flat colour", "images": [b64(d) for d in images]}


def idle_connections(server: Server, n: int, wait_s: float) -> str:
    """Open `n` connections that send nothing; after `wait_s`, count how many the server still holds open."""
    socks = []
    for _ in range(n):
        try:
            socks.append(socket.create_connection(("127.0.0.1", server.port), timeout=5))
        except OSError:
            break
    time.sleep(wait_s)
    held = 0
    for s in socks:
        s.setblocking(False)
        try:
            held += s.recv(1) != b""  # b"": closed by the server
        except BlockingIOError:
            held += 1  # still open, nothing to read
        except OSError:
            pass
    try:
        health = httpx.get(f"{server.url}/healthz", timeout=10).status_code
    except httpx.HTTPError as e:
        health = type(e).__name__
    for s in socks:
        s.close()
    return f"{len(socks)} opened, {held} still held after {wait_s:g} s; /healthz then: {health}"


def huge_header(server: Server, mib: int) -> str:
    with socket.create_connection(("127.0.0.1", server.port), timeout=300) as s:
        s.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Junk: ")
        chunk = b"a" * (1 << 20)
        try:
            for _ in range(mib):
                s.sendall(chunk)
            s.sendall(b"\r\n\r\n")
        except OSError as e:
            return f"closed by the server while sending ({type(e).__name__})"
        answer = s.recv(200)
        return answer.split(b"\r\n")[0].decode("latin-1") or "closed"


def stalled_uploads(server: Server, n: int) -> str:
    """`n` uploads of one client (one key) that send their headers and 10 bytes of a 1 MB body, then stall;
    meanwhile another client (another key) posts a small /reward."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=60)
        s.sendall(f"POST /reward HTTP/1.1\r\nHost: x\r\nX-API-Key: {KEY}\r\nContent-Type: application/json\r\n"
                  f"Content-Length: 1000000\r\n\r\n{{\"prompt\": ".encode())
        socks.append(s)
    time.sleep(0.5)
    r = httpx.post(f"{server.url}/reward", headers={"X-API-Key": OTHER_KEY}, json=reward_json([flat_image("PNG", (64, 64))]), timeout=60)
    for s in socks:
        s.close()
    return f"another client's /reward: {r.status_code}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exe", default=str(Path(sys.executable).parent / "t2i-reward"))
    p.add_argument("--rss-cap-mb", type=int, default=6000)
    p.add_argument("--only", nargs="*", help="run only these attacks")
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    env = {"T2I_SERVICE_API_KEYS": json.dumps([KEY, OTHER_KEY]), "T2I_SERVICE_REDIS_URL": "redis://127.0.0.1:6379/12",
           "T2I_SERVICE_MLLM__MODEL": "tiny", "T2I_SERVICE_MLLM__IMAGE_SIZE": "56", "HF_HUB_OFFLINE": "1"}
    webp = flat_image("WEBP", lossless=True)
    bomb = scan_bomb_jpeg(BIG, 100)
    attacks = {
        "one 40 MP lossless WebP": lambda s: post(s, "/reward", json=reward_json([webp])),
        "16 x 40 MP lossless WebP": lambda s: post(s, "/reward", json=reward_json([webp] * 16)),
        "6 x 40 MP lossless WebP (at the pixel budget)": lambda s: post(s, "/reward", json=reward_json([webp] * 6)),
        "progressive JPEG, 40 MP, 100 scans": lambda s: post(s, "/reward", json=reward_json([bomb])),
        "progressive JPEG, 40 MP, 32 scans (the most accepted)": lambda s: post(s, "/reward", json=reward_json([scan_bomb_jpeg(BIG, 32)])),
        "8 x JPEG 2000 4000x4000": lambda s: post(s, "/reward", json=reward_json([flat_image("JPEG2000", (4000, 4000))] * 8)),
        "safetensors, 1M empty tensors": lambda s: post(s, "/reward", content=many_tensors(), headers={"Content-Type": "application/octet-stream"}),
        "/verify, 16 x 40 MP lossless WebP": lambda s: post(s, "/verify", json={"prompt": "a flat colour", "images": [b64(webp)] * 16}),
        "16 MiB header": lambda s: huge_header(s, 16),
        "32 stalled uploads": lambda s: stalled_uploads(s, 32),
        "JSON: 5,000-digit integer in metadata": lambda s: post(s, "/reward/gradient", content=tensor_body({"prompts": '"a"', "weights": '{"mlp": ' + BIG_INT + "}"}),
                                                            headers={"Content-Type": "application/octet-stream"}),
        "JSON: deep nesting in metadata": lambda s: post(s, "/reward", content=tensor_body({"prompts": DEEP}), headers={"Content-Type": "application/octet-stream"}),
    }
    results = []
    server = Server(args.exe, env, rss_cap_mb=args.rss_cap_mb)
    try:
        for name, attack in attacks.items():
            if args.only and name not in args.only:
                continue
            if server.proc.poll() is not None:  # killed by the last one: a fresh server
                server = Server(args.exe, env, rss_cap_mb=args.rss_cap_mb)
            results.append(measure(server, name, lambda: attack(server)))
    finally:
        server.stop()
    if not args.only or "1,100 idle connections (nofile 1024)" in args.only:
        server = Server(args.exe, env, nofile=1024, rss_cap_mb=args.rss_cap_mb)
        try:
            results.append(measure(server, "1,100 idle connections (nofile 1024)", lambda: idle_connections(server, 1100, 8)))
        finally:
            server.stop()
    if args.out:
        args.out.write_text(json.dumps({"exe": args.exe, "date": time.strftime("%Y-%m-%d %H:%M"), "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
