#!/usr/bin/env bash
# The GPU lane in one command: stage vLLM + the project's dependencies, run GPU tests and
# benchmarks, print a summary. Runs ON the GPU machine (driven from here by the `run` tool);
# see ops/gpu/README.md for the exact sequence of `run` calls and their `carry`.
#
#   bash ops/gpu/run.sh [--budget S] [STEP ...]      (steps: python3 ops/gpu/driver.py --list)
#
# Every call first copies whichever staging chunk it carried (.gpu-wheels/stage/sNN, made here
# by ops/gpu/pack.sh) into /tmp/vx, which survives between calls while the machine stays
# warm. Once all chunks are there it checks the SHA-256 and installs everything into
# /tmp/site (once per machine). Then, if steps were named and the install is done, it runs
# them through ops/gpu/driver.py: logs, JSON figures and the summary go to $OUT.
set -uo pipefail
cd "$(dirname "$0")/../.."
export OUT=${OUT:-/tmp/conveyor-out}
mkdir -p "$OUT" /tmp/vx
# NVLink multicast stays off on the multi-GPU kinds (KINDS.md); harmless elsewhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1
# torch.cuda.is_available() through NVML: a parent that only asked must still be able to fork
# vLLM's engine core (a CUDA-initialised parent cannot, and vLLM's spawn path hung in pytest).
export PYTORCH_NVML_BASED_CUDA_CHECK=1
S=.gpu-wheels/stage
for f in "$S"/s?? "$S"/SHA256 "$S"/COUNT; do
  [ -f "$f" ] && cp "$f" /tmp/vx/ && echo "staged $(basename "$f") ($(stat -c %s "$f") bytes)"
done

MARK=/tmp/site/.conveyor-installed
if [ ! -f $MARK ]; then
  want=$(cat /tmp/vx/COUNT 2>/dev/null || echo "?")
  have=$(ls /tmp/vx/s?? 2>/dev/null | wc -l)
  if [ "$want" = "?" ] || [ "$have" -lt "$want" ]; then
    echo "staging: $have of $want chunks in /tmp/vx; carry the next one (ops/gpu/README.md)"
    [ $# -gt 0 ] && echo "steps not run: nothing installed yet"
    exit 0
  fi
  t0=$(date +%s)
  (cd /tmp/vx && cat s?? | sha256sum | sed 's/-$/stage.tar/' | diff - <(head -1 SHA256)) \
    || { echo "staging: SHA-256 of the chunks differs from SHA256: re-carry them"; exit 2; }
  rm -rf /tmp/vw && mkdir -p /tmp/vw && (cd /tmp/vx && cat s?? | tar -xf - -C /tmp/vw) || exit 2
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site \
    $(sed 's#^#/tmp/vw/#' /tmp/vw/wheels.txt) 2>&1 | grep -v "^WARNING: Target directory" | tail -5
  rm -rf /tmp/vw
  PYTHONPATH=/tmp/site python3 -c "import vllm, zmq, msgspec, structlog; print('installed vllm', vllm.__version__)" \
    || exit 2
  touch $MARK
  echo "install: $(( $(date +%s) - t0 )) s"
fi
export PYTHONPATH=/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}
[ $# -eq 0 ] && { echo "installed; no steps named"; exit 0; }
exec python3 ops/gpu/driver.py "$@"
