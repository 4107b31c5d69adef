#!/usr/bin/env bash
# The GPU check in one command, for a GPU machine that cannot install packages.
#
#   bash benchmarks/gpu_check.sh [OUT_DIR] [gpu_check.py options...]
#
# 1. Installs the wheels found in .whl/ at the repository root (if any) into a scratch folder put
#    first on PYTHONPATH: the Python packages the machine lacks. reclight itself runs from the
#    checkout (PYTHONPATH), so it needs no install. The GPU image's package list has no
#    jsonargparse (the CLI's parser); fetch its wheels where pip reaches a package index, at the
#    repository root:
#      python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#        --implementation cp --platform manylinux2014_x86_64 -d .whl \
#        jsonargparse==4.53.0 docstring-parser==0.18.0 typeshed-client==2.15.0
#    (.whl/ is git-ignored; the three are pure-Python wheels, about 1 MB together; their own needs,
#    PyYAML and typing-extensions, are on the image.)
# 2. Runs benchmarks/gpu_check.py under `timeout` (GPU_CHECK_TIMEOUT seconds, default 450: the
#    script's own budget is 400 s; on SIGTERM it still prints its table; 30 s later it is killed),
#    writing OUT_DIR/gpu_check.{json,md} (after every section) and the whole log to OUT_DIR/gpu_check.log.
# Exit status: the script's (0: no FAIL row, 1: a FAIL row, 2: no CUDA), 124 on the timeout.
set -uo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
out_dir="${1:-}"
[ "$#" -gt 0 ] && shift
site="${GPU_CHECK_SITE:-/tmp/reclight-gpu-check-site}"

shopt -s nullglob
wheels=("$root"/.whl/*.whl)
if [ "${#wheels[@]}" -gt 0 ]; then
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
    || { echo "gpu_check.sh: installing ${#wheels[@]} wheel(s) from .whl/ failed" >&2; exit 3; }
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
"$py" -c "import jsonargparse" 2>/dev/null \
  || echo "gpu_check.sh: WARNING: jsonargparse is not importable, so the fit section will FAIL (wheels: this file's header)" >&2
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false

args=("$@")
log=/dev/null
if [ -n "$out_dir" ]; then
  mkdir -p "$out_dir"
  args=(--out "$out_dir" ${args[@]+"${args[@]}"})
  log="$out_dir/gpu_check.log"
fi
"$py" -c "import torch; print('gpu_check.sh: torch', torch.__version__, 'cuda', torch.cuda.is_available())"
timeout -s TERM -k 30 "${GPU_CHECK_TIMEOUT:-450}" "$py" "$root/benchmarks/gpu_check.py" ${args[@]+"${args[@]}"} 2>&1 | tee "$log"
