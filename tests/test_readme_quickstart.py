"""The README's fine-tuning quickstart, run as a user runs it: its own lines, from a fresh folder, with no
T2I_* environment variable (defaults only: port 8000, Redis db 0, ./jobs, the user's model cache)."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def quickstart_lines() -> list[str]:
    """The shell block of the README's 'Fine-tuning jobs' section, continuation lines joined, comments dropped."""
    section = README.read_text().split("## Fine-tuning jobs", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = block.replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def test_readme_finetune_quickstart(tmp_path):
    lines = quickstart_lines()
    serve, worker, submit = lines[0], lines[1], lines[2]
    assert serve.startswith("t2i-reward serve") and worker.startswith("t2i-reward worker") and submit.startswith("curl")
    try:
        httpx.get("http://127.0.0.1:8000/healthz", timeout=1)
        pytest.fail("port 8000 is taken: the README's quickstart needs it")
    except httpx.HTTPError:
        pass
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2I_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # the installed t2i-reward command
    procs = []
    try:
        for i, line in enumerate((serve, worker)):
            log = open(tmp_path / f"{i}.log", "w")
            procs.append(subprocess.Popen(["bash", "-c", line.removesuffix("&").strip()], cwd=tmp_path, env=env,
                                          stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
        end = time.time() + 300
        while True:
            assert all(p.poll() is None for p in procs), (tmp_path / "0.log").read_text()[-3000:]
            try:
                if httpx.get("http://127.0.0.1:8000/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.time() < end, "the service never became ready:\n" + (tmp_path / "0.log").read_text()[-3000:]
            time.sleep(0.5)
        answer = subprocess.run(["bash", "-c", submit], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
        job = json.loads(answer.stdout)
        assert job["status"] == "queued", answer.stdout
        status_line = lines[3].replace("<id>", job["id"])
        end = time.time() + 900
        while True:
            state = json.loads(subprocess.run(["bash", "-c", status_line], cwd=tmp_path, env=env,
                                              capture_output=True, text=True, timeout=60).stdout)
            if state["status"] in ("succeeded", "failed", "cancelled"):
                break
            assert time.time() < end, f"the job did not finish: {state}"
            time.sleep(1)
        assert state["status"] == "succeeded", f"{state['error']}\n" + (tmp_path / "1.log").read_text()[-3000:]
        assert state["progress"]["step"] == 20 and "pytorch_lora_weights.safetensors" in state["artifacts"]
        assert (tmp_path / "jobs" / job["id"] / "report.png").is_file()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
