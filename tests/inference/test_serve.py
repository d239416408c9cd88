"""`vllm serve` with the plugin flags (through `stepprobe serve`), behind the
OpenAI-compatible endpoint, on loopback."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

pytestmark = pytest.mark.vllm


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        return json.loads(r.read())


def test_vllm_serve_with_plugin_prunes_over_http(tiny_model_path, planted_scorer, helpers, tmp_path):
    port = _free_port()
    # `stepprobe serve` runs vLLM's own `vllm serve` CLI in-process with the plugin flags
    # (the `vllm` console script of the CPU wheel cannot start; see inference/serve.py).
    cmd = [sys.executable, "-m", "stepprobe.cli", "serve", "--model", tiny_model_path, "--scorer", planted_scorer,
           "--policy", "threshold", "--threshold", "0.5", "--warmup-steps", "2", "--kv-cache-gib", "1",
           "--", "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32", "--max-model-len", "256",
           "--seed", "0"]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 900
        while True:
            assert proc.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.time() < deadline, "vllm serve did not come up"
            time.sleep(2)
        # the worker's start-up self-test ran in the server's engine before it served anything
        assert "stepprobe start-up self-test passed" in (tmp_path / "serve.log").read_text()
        base = f"http://127.0.0.1:{port}/v1/completions"
        bad = _post(base, {"model": tiny_model_path, "prompt": "Bad:", "max_tokens": 30, "temperature": 1.0,
                           "n": 2, "logit_bias": {str(k): v for k, v in helpers.bad_bias().items()}})
        assert [c["finish_reason"] for c in bad["choices"]] == ["stop", "stop"]
        assert [c.get("stop_reason") for c in bad["choices"]] == ["pruned", "pruned"]
        good = _post(base, {"model": tiny_model_path, "prompt": "Good:", "max_tokens": 30, "temperature": 1.0,
                            "logit_bias": {str(k): v for k, v in helpers.good_bias().items()}})
        assert good["choices"][0]["finish_reason"] == "length"
        # a request can turn pruning off
        off = _post(base, {"model": tiny_model_path, "prompt": "Bad:", "max_tokens": 30, "temperature": 1.0,
                           "logit_bias": {str(k): v for k, v in helpers.bad_bias().items()},
                           "vllm_xargs": {"stepprobe_policy": "none"}})
        assert off["choices"][0]["finish_reason"] == "length"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_serve_prints_the_vllm_serve_command_and_refuses_bad_input(tiny_model_path, planted_scorer, default_model_path,
                                                                 capsys):
    from stepprobe.cli import main

    assert main(["serve", "--model", tiny_model_path, "--scorer", planted_scorer, "--policy", "memory",
                 "--print-command", "--", "--port", "8123", "--max-model-len", "256"]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert line.startswith(f"vllm serve {tiny_model_path} --worker-cls stepprobe.inference.worker.StepprobeWorker "
                           "--scheduler-cls stepprobe.inference.scheduler.StepprobeScheduler --additional-config ")
    assert line.endswith("--port 8123 --max-model-len 256")
    assert '"policy": "memory"' in line and os.path.abspath(planted_scorer) in line
    # a scorer made for another model, an unknown policy, --model after "--": one line each
    assert main(["serve", "--model", default_model_path, "--scorer", planted_scorer, "--print-command"]) == 2
    assert "reads hidden size 64" in capsys.readouterr().err
    assert main(["serve", "--policy", "best", "--print-command"]) == 2
    assert "unknown pruning policy 'best'" in capsys.readouterr().err
    assert main(["serve", "--model", tiny_model_path, "--print-command", "--", "--model", "x"]) == 2
    assert "--model before" in capsys.readouterr().err
    # a configuration the capture cannot score (issue 15): refused before vLLM starts
    assert main(["serve", "--model", tiny_model_path, "--scorer", planted_scorer, "--print-command", "--",
                 "--pipeline-parallel-size", "2"]) == 2
    err = capsys.readouterr().err
    assert "cannot score with pipeline parallelism" in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("case", ["data-parallel", "other-model"])
def test_plain_vllm_serve_refuses_in_one_line_before_the_weights_load(case, tiny_model_path, default_model_path,
                                                                      planted_scorer):
    """Issue 22 defect 5: plain `vllm serve` (vLLM's own CLI; the general plugin entry point
    checks the config in the API server process) refuses a configuration the plugin cannot
    score, or a scorer made for another model, in one line with exit code 2, before any
    engine process starts."""
    from stepprobe.inference.plugin import SCHEDULER_CLS, WORKER_CLS

    model, extra = (tiny_model_path, ["--data-parallel-size", "2"]) if case == "data-parallel" \
        else (default_model_path, [])
    argv = ["serve", model, "--worker-cls", WORKER_CLS, "--scheduler-cls", SCHEDULER_CLS, "--additional-config",
            json.dumps({"stepprobe": {"scorer": planted_scorer, "policy": "memory"}}), "--enforce-eager",
            "--max-model-len", "256", "--port", str(_free_port()), *extra]
    code = ("import sys; from stepprobe.inference.serve import run_vllm_cli; "
            f"run_vllm_cli({argv!r})")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    err = [ln for ln in p.stderr.splitlines() if ln.strip() and "Warning" not in ln and "warn(" not in ln]
    assert p.returncode == 2, (p.stdout[-2000:], p.stderr[-3000:])
    assert "Traceback" not in p.stderr and err[-1].startswith("stepprobe: error: "), p.stderr[-3000:]
    assert ("data parallelism" if case == "data-parallel" else "hidden size") in err[-1], err[-1]
    assert "EngineCore" not in p.stdout + p.stderr and "Loading weights" not in p.stdout + p.stderr
