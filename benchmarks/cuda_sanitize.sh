#!/bin/bash
# compute-sanitizer memcheck and racecheck on a representative subset of the CUDA tests: every
# variant (decode, the specialised decodes, prefill4, the general tiles, large_batch, simd), all
# three codebooks with mixed 6/2/3 and half-integer rates, a shared expert, partial tiles (3, 17 and
# 33 tokens), the fp16 re-run path, invalid ids, every decode rate and a graph replay.
# Usage: bash benchmarks/cuda_sanitize.sh REPO
REPO=${1:-$(pwd)}
KEYS="variant_matches or exl3_moe or fp16_overflow or invalid_ids or decoder_every_rate or graph_capture"
for tool in memcheck racecheck; do
  echo "== $tool"
  METAL_MOE_CUDA_SUBSET=$tool compute-sanitizer --tool $tool --error-exitcode 99 --target-processes all \
    python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_cuda_backend.py" -k "$KEYS" 2>&1 | tail -25
  echo "== $tool exit status: ${PIPESTATUS[0]}"
done
