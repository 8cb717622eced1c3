#!/usr/bin/env bash
# Runs HERE (the machine with the checkout), once: packs everything the GPU machine lacks into
# chunks small enough for one `run` call each (the working tree + carried paths travel at
# most 64 MiB per call).
#
#   bash ops/gpu/pack.sh            # -> .gpu-wheels/stage/s00 .. sNN and .gpu-wheels/stage/SHA256
#   bash ops/gpu/pack.sh --with-ray # also Ray (only vLLM's own IPC weight-transfer backend imports it)
#
# Inputs (git-ignored, made by ../shared/gpu/stage-vllm.sh): .gpu-wheels/dl/vllm-0.26.0-*.whl (or
# the split .gpu-wheels/vllm/p0*), .gpu-wheels/deps/*.whl and .gpu-wheels/fi/*.whl (vLLM's pinned
# dependencies and FlashInfer), and .whl/gpu-lane/*.whl (the project's own pure-Python
# dependencies the image lacks: structlog, math-verify and its parser, pytest-asyncio).
# Output: one uncompressed tar (wheels are compressed already) of those wheels, split into
# CHUNK_MIB pieces. Ray is left out by default: our weight paths (CUDA IPC handles as plain
# fields, NCCL through vLLM's nccl_common) never import it, and it costs two more calls.
set -euo pipefail
cd "$(dirname "$0")/../.."
CHUNK_MIB=${CHUNK_MIB:-61}   # 64 MiB limit minus the working tree (~1 MiB) and a margin
G=.gpu-wheels
OUT=$G/stage
WITH_RAY=0
[ "${1:-}" = "--with-ray" ] && WITH_RAY=1
grep -qx '/.gpu-wheels/' .git/info/exclude 2>/dev/null || echo '/.gpu-wheels/' >> .git/info/exclude
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude

tmp=$(mktemp -d /tmp/conveyor-pack.XXXX)
trap 'rm -rf "$tmp"' EXIT
mkdir -p "$tmp/w"
vllm_whl=$G/dl/vllm-0.26.0-cp38-abi3-manylinux_2_28_x86_64.whl
if [ -f "$vllm_whl" ]; then
  ln "$vllm_whl" "$tmp/w/" 2>/dev/null || cp "$vllm_whl" "$tmp/w/"
else
  cat $G/vllm/p0? > "$tmp/w/$(basename "$vllm_whl")"
fi
(cd "$tmp/w" && grep vllm- "$OLDPWD/$G/vllm/MD5" | sed 's#  .*/#  #' | md5sum -c -)
if [ $WITH_RAY = 1 ]; then
  if [ -f $G/dl/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl ]; then cp $G/dl/ray-2.60.0-*.whl "$tmp/w/"
  else cat $G/vllm/r0? > "$tmp/w/ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"; fi
fi
cp $G/deps/*.whl $G/fi/*.whl .whl/gpu-lane/*.whl "$tmp/w/"
# One version of each distribution (pip refuses two): the first copy wins.
(cd "$tmp/w" && ls *.whl | awk -F- '{n=tolower($1); if (seen[n]++) print $0}' | xargs -r rm -v)
rm -rf "$OUT" && mkdir -p "$OUT"
(cd "$tmp/w" && ls *.whl > wheels.txt && tar -cf - wheels.txt *.whl) | split -b ${CHUNK_MIB}M -d -a 2 - "$OUT/s"
(cd "$OUT" && cat s?? | sha256sum | sed 's/-$/stage.tar/' > SHA256 && ls s?? | wc -l > COUNT)
echo "packed $(cat $OUT/COUNT) chunks of <= ${CHUNK_MIB} MiB into $OUT:"
ls -l "$OUT"
