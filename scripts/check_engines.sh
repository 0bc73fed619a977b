#!/usr/bin/env bash
# Check kvbucket's engine adapters against the REAL engine packages, on CPU.
#
#   scripts/check_engines.sh [--engines sglang,lmcache,vllm] [--keep]
#
# Builds (once) a separate venv -- $KVBUCKET_ENGINES_VENV, default
# ~/.cache/kvbucket/engines-venv, never inside the repo -- with CPU torch,
# the pinned engines installed --no-deps (their full dependency trees pull
# CUDA wheels and gigabytes) and the few packages their modules import,
# installs kvbucket from this checkout, then runs scripts/check_engines.py.
# Needs ~4 GB of disk; remove the venv afterwards if you like. Not part of CI.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV="${KVBUCKET_ENGINES_VENV:-$HOME/.cache/kvbucket/engines-venv}"
PY="$VENV/bin/python"

TORCH="torch==2.13.0"
ENGINES=(sglang==0.5.23 lmcache==0.5.6 vllm==0.33.0)
# The packages the engines' storage/offload modules import, installed --no-deps next to the engines.
SGLANG_DEPS=(numpy orjson psutil pybase64 requests urllib3 idna certifi charset_normalizer triton packaging pillow
  starlette anyio msgspec pydantic pydantic-core typing-inspection pyzmq tqdm ipython traitlets pygments
  aiohttp multidict yarl propcache aiosignal frozenlist aiohappyeyeballs attrs)
LMCACHE_DEPS=(pyyaml cachetools sortedcontainers numba llvmlite prometheus_client py-cpuinfo aiofile caio
  transformers safetensors tokenizers regex huggingface_hub httpx2 httpcore2 truststore h11 cryptography cffi pycparser)
VLLM_DEPS=(cbor2 openai sniffio jiter distro openai_harmony cloudpickle uvloop xgrammar apache-tvm-ffi fastapi
  annotated_doc opentelemetry-api importlib-metadata zipp annotated_types partial_json_parser llguidance)

pip_q() { "$PY" -m pip install --quiet --disable-pip-version-check "$@"; }

if [ ! -x "$PY" ]; then
  echo "creating $VENV"
  mkdir -p "$(dirname "$VENV")"
  python3 -m venv "$VENV"
fi
stamp="$VENV/.kvbucket-engines-installed"
if [ ! -f "$stamp" ]; then
  echo "installing $TORCH (CPU), ${ENGINES[*]} (--no-deps) and their module dependencies"
  pip_q "$TORCH"
  pip_q --no-deps "${ENGINES[@]}"
  pip_q --no-deps "${SGLANG_DEPS[@]}" "${LMCACHE_DEPS[@]}" "${VLLM_DEPS[@]}"
  touch "$stamp"
fi
echo "installing kvbucket from $(pwd)"
pip_q --no-deps --force-reinstall .
pip_q crc32c==2.9.post0 click==8.5.1 tqdm==4.70.1

# Run from outside the checkout so that the installed kvbucket is the one imported.
cd /
exec "$PY" "$OLDPWD/scripts/check_engines.py" "$@"
