"""The README's and the quickstart page's code, run as a user runs it: from a fresh folder, with no T2I_*
environment variable (defaults only: port 8000, Redis db 0, ./jobs, the user's model cache).

The convention (docs/testing.md): every ```python and ```bash block of README.md and docs/quickstart.md runs,
in order, unless the line before it is `<!-- not-run: why -->`. The README's fine-tuning block is one of
those; `test_readme_finetune_quickstart` runs it line by line, filling in the job's id, and checks the job.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
RUN_DOCS = [README, ROOT / "docs" / "quickstart.md"]
BLOCK = re.compile(r"^(?:<!-- not-run:(?P<why>[^\n]*?)-->\n)?```(?P<lang>[\w-]*)\n(?P<code>.*?)^```", re.S | re.M)
ERROR_ANSWER = re.compile(r'^\s*\{"detail"', re.M)  # the service's error shape, as curl prints it


def code_blocks(path: Path) -> list[tuple[str, str, str | None]]:
    """(language, code, why it is not run or None) of every fenced block of `path`, in order."""
    return [(m["lang"], m["code"], m["why"].strip() if m["why"] is not None else None) for m in BLOCK.finditer(path.read_text())]


def user_env() -> dict[str, str]:
    """The environment of a user who has not set any T2I_* variable, with the installed commands first on PATH."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("T2I_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
    return env


def port_8000_is_free() -> None:
    try:
        httpx.get("http://127.0.0.1:8000/healthz", timeout=1)
        pytest.fail("port 8000 is taken: the quickstarts need it")
    except httpx.HTTPError:
        pass


def stop(groups: list[int]) -> None:
    """Stop the process groups the blocks left running (servers and workers started with `&`)."""
    for pgid in groups:
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    end = time.time() + 30
    for pgid in groups:
        while time.time() < end:
            try:
                os.killpg(pgid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_every_not_run_block_says_why():
    for path in RUN_DOCS:
        blocks = code_blocks(path)
        run = [b for b in blocks if b[0] in ("python", "bash") and b[2] is None]
        assert len(run) >= 3, f"{path.name}: only {len(run)} runnable blocks"
        assert all(why for lang, _, why in blocks if why is not None), f"{path.name}: a not-run marker without a reason"


@pytest.mark.parametrize("doc", RUN_DOCS, ids=[p.name for p in RUN_DOCS])
def test_every_code_block_runs(doc, tmp_path):
    """Each python block in its own interpreter, each bash block as one `bash -e` script in its own process
    group; what a block starts in the background (`&`) runs on for the blocks after it."""
    port_8000_is_free()
    (tmp_path / "docs").mkdir()
    shutil.copy(ROOT / "docs" / "example.png", tmp_path / "docs" / "example.png")  # the blocks run from a clone's root
    env, groups = user_env(), []
    try:
        for i, (lang, code, why) in enumerate(code_blocks(doc)):
            if lang not in ("python", "bash") or why is not None:
                continue
            script = tmp_path / f"block-{i}.{'py' if lang == 'python' else 'sh'}"
            script.write_text(code)
            command = [sys.executable, script.name] if lang == "python" else ["bash", "-e", "-o", "pipefail", script.name]
            log = tmp_path / f"block-{i}.log"
            with open(log, "w") as out:  # a file, not a pipe: background children keep it open
                proc = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
                groups.append(proc.pid)
                try:
                    rc = proc.wait(timeout=900)
                except subprocess.TimeoutExpired:
                    pytest.fail(f"{doc.name} block {i} ({lang}) did not finish:\n{code}\n{log.read_text()[-3000:]}")
            output = log.read_text()
            assert rc == 0, f"{doc.name} block {i} ({lang}) exited {rc}:\n{code}\n{output[-4000:]}"
            assert not ERROR_ANSWER.search(output), f"{doc.name} block {i} got an error answer:\n{output[-3000:]}"
    finally:
        stop(groups)


def quickstart_lines() -> list[str]:
    """The shell block of the README's fine-tuning quickstart, continuation lines joined, comments dropped."""
    section = README.read_text().split("## Quickstart: a fine-tuning job", 1)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    block = block.replace("\\\n", " ")
    return [re.sub(r"\s+#.*$", "", line).strip() for line in block.splitlines() if line.strip()]


def test_readme_finetune_quickstart(tmp_path):
    lines = quickstart_lines()
    serve, worker, submit, status, direct = lines
    assert serve.startswith("t2i-reward serve") and worker.startswith("t2i-reward worker") and submit.startswith("curl")
    assert direct.startswith("t2i-reward finetune") and "--spec job.json" in direct
    port_8000_is_free()
    env = user_env()
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
        status_line = status.replace("<id>", job["id"])
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
        # the same job without the queue: its JSON (the curl's body) in job.json, as the README says
        (tmp_path / "job.json").write_text(re.search(r"-d '(.*)'", submit).group(1))
        run = subprocess.run(["bash", "-c", direct], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
        metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
        assert (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file() and (tmp_path / "out" / "report.png").is_file()
        assert len(metrics["reward"]) == 20, metrics.keys()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGTERM)
        for p in procs:
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
