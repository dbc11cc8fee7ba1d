#!/usr/bin/env bash
# The decode-step GEMV (KVQ_GEMV=1, off by default until this passes) with programmatic dependent
# launches (PDL), checked and timed on the GPU machine in
# one device session of two back-to-back calls (the model travels in two halves, see bench-gpu.sh):
#   1. carry [".carry-m1", ".carry-bin"]  command "bash scripts/gemv-pdl.sh kernels"
#      kernel parity with every kernel a programmatic dependent (KVQ_PDL_ALL=1), the GEMM shapes and whole
#      steps' GEMMs through the GEMV vs cuBLAS, with and without PDL
#   2. carry [".carry-m2"]                command "bash scripts/gemv-pdl.sh engine"
#      op checks (GEMV vs CPU), graphs vs direct launches (exact) and the engine vs the CPU path on the real
#      model (KVQ_PDL_ALL=1), then `kvq bench decode` on it with PDL for every kernel / for the GEMV only /
#      off / cuBLAS GEMMs, in the same run
# or one call, carry [".carry-bin"], command "bash scripts/gemv-pdl.sh single" (no real model).
set -uo pipefail
export LD_LIBRARY_PATH=/usr/local/cuda/lib64:${LD_LIBRARY_PATH:-}
OUT=${OUT:-/tmp/kvq-out}; mkdir -p "$OUT"
S=/root/stash; mkdir -p "$S"
small="$S/SmolLM2-135M-Instruct.Q4_1.gguf"
model_sha=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
for d in .carry-m1 .carry-m2 .carry-bin; do [ -d "$d" ] && cp -r "$d"/. "$S"/; done
for b in kvq kvq-gpu; do [ -f "$S/$b.xz" ] && [ ! -x "$S/$b" ] && xz -dc "$S/$b.xz" > "$S/$b" && chmod +x "$S/$b"; done
case "${1:-}" in
kernels)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  # Decode/encode parity with every kernel launched as a programmatic dependent (a third of the cases).
  KVQ_GEMV=1 KVQ_PDL_ALL=1 KVQ_CHECK_FILTER="${FILTER:-hq=8 hkv=2}" timeout 150 "$S/kvq-gpu" check > "$OUT/check-pdlall.txt" 2>&1
  echo "check (KVQ_PDL_ALL=1) rc=$?"; grep -E "^FAIL|^parity" "$OUT/check-pdlall.txt" | head
  for p in 1 0; do
    echo "== KVQ_PDL=$p"; KVQ_PDL=$p timeout 100 "$S/kvq-gpu" gemm-bench 2>&1 | tee "$OUT/gemm-pdl$p.txt" | grep -v "^GPU"
  done
  ;;
engine)
  if [ ! -f "$small" ]; then
    cat "$S/model.part.00" "$S/model.part.01" > "$small.tmp"
    [ "$(sha256sum "$small.tmp" | cut -d' ' -f1)" = "$model_sha" ] && mv "$small.tmp" "$small" && echo "model ok"
  fi
  # The engine checks with every kernel a programmatic dependent (the widest use of it).
  KVQ_GEMV=1 KVQ_PDL_ALL=1 timeout 150 "$S/kvq-gpu" engine-check --model "$small" > "$OUT/engine.txt" 2>&1; echo "engine-check rc=$?"
  grep -E "^FAIL|gemm.*gemv|checks" "$OUT/engine.txt" | cut -c1-160
  KVQ_GEMV=1 KVQ_PDL_ALL=1 KVQ_MODEL="$small" timeout 150 "$S/kvq-gpu" resident-check > "$OUT/resident.txt" 2>&1; echo "resident-check rc=$?"
  grep -E "FAIL|graphs|replayed|real model" "$OUT/resident.txt" | cut -c1-200
  for v in "KVQ_GEMV=1 KVQ_PDL_ALL=1" "KVQ_GEMV=1" "KVQ_GEMV=1 KVQ_PDL=0" "KVQ_GEMV=0"; do
    echo "== $v"
    env $v timeout 100 "$S/kvq" bench decode --model "$small" --name "SmolLM2-135M Q4_1, $v" --ctx 4096,32768 --batch 1,2,8 \
      --steps 32 --json "$OUT/bench-$(echo $v | tr " =" "_-").json" --kv fp16 --kv kivi:bits=2,window=0 2>&1 | tee "$OUT/bench-$(echo $v | tr " =" "_-").log" | grep "T="
  done
  ;;
single)
  # One call without the real model (when device time is short), most important first: op checks and
  # tiny-model engine checks and graphs vs direct launches with every kernel a programmatic dependent,
  # decode steps of a random model of SmolLM2-135M's shape under each PDL variant, the GEMM timings with
  # and without PDL, then decode parity with every kernel a programmatic dependent (a third of the cases).
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  KVQ_GEMV=1 KVQ_PDL_ALL=1 timeout 60 "$S/kvq-gpu" engine-check > "$OUT/engine.txt" 2>&1; echo "engine-check (KVQ_PDL_ALL=1) rc=$?"
  grep -E "^FAIL|gemm.*gemv|checks" "$OUT/engine.txt" | cut -c1-160
  KVQ_GEMV=1 KVQ_PDL_ALL=1 timeout 60 "$S/kvq-gpu" resident-check > "$OUT/resident.txt" 2>&1; echo "resident-check (KVQ_PDL_ALL=1) rc=$?"
  grep -E "FAIL|graphs|replayed" "$OUT/resident.txt" | cut -c1-200
  "$S/kvq-gpu" random-model /tmp/rm135
  for v in "KVQ_GEMV=1 KVQ_PDL_ALL=1" "KVQ_GEMV=1" "KVQ_GEMV=1 KVQ_PDL=0" "KVQ_GEMV=0"; do
    echo "== $v"
    env $v timeout 40 "$S/kvq" bench decode --model /tmp/rm135 --name "random SmolLM2-135M shape, $v" --ctx 4096,32768 --batch 1,2,8 \
      --steps 32 --json "$OUT/bench-$(echo $v | tr " =" "_-").json" --kv fp16 --kv kivi:bits=2,window=0 2>&1 | tee "$OUT/bench-$(echo $v | tr " =" "_-").log" | grep "T=" | cut -c1-120
  done
  for p in 1 0; do
    echo "== KVQ_PDL=$p"; KVQ_PDL=$p timeout 40 "$S/kvq-gpu" gemm-bench 2>&1 | tee "$OUT/gemm-pdl$p.txt" | grep -v "^GPU"
  done
  KVQ_GEMV=1 KVQ_PDL_ALL=1 KVQ_CHECK_FILTER="${FILTER:-hq=8 hkv=2}" timeout 60 "$S/kvq-gpu" check > "$OUT/check-pdlall.txt" 2>&1
  echo "check (KVQ_PDL_ALL=1) rc=$?"; grep -E "^FAIL|^parity" "$OUT/check-pdlall.txt" | head
  ;;
last)
  # The shortest useful call (about 80 s): engine/op checks with every kernel a programmatic dependent,
  # decode steps of a random SmolLM2-135M-shape model at 4k under three variants, graphs vs direct.
  KVQ_GEMV=1 KVQ_PDL_ALL=1 timeout 35 "$S/kvq-gpu" engine-check > "$OUT/engine.txt" 2>&1; echo "engine-check (KVQ_PDL_ALL=1) rc=$?"
  grep -E "^FAIL|gemm.*gemv|checks" "$OUT/engine.txt" | cut -c1-150
  "$S/kvq-gpu" random-model /tmp/rm135 >/dev/null
  for v in "KVQ_GEMV=1 KVQ_PDL_ALL=1" "KVQ_GEMV=1" "KVQ_GEMV=0"; do
    env $v timeout 14 "$S/kvq" bench decode --model /tmp/rm135 --name "random 135M shape, $v" --ctx 4096 --batch 1,2,8 \
      --steps 32 --json "$OUT/bench-$(echo $v | tr " =" "_-").json" --kv fp16 2>&1 | tee "$OUT/bench-$(echo $v | tr " =" "_-").log" | grep "T=" | sed "s/^/$v /" | cut -c1-140
  done
  KVQ_GEMV=1 KVQ_PDL_ALL=1 timeout 40 "$S/kvq-gpu" resident-check > "$OUT/resident.txt" 2>&1; echo "resident-check (KVQ_PDL_ALL=1) rc=$?"
  grep -E "FAIL|graphs" "$OUT/resident.txt" | cut -c1-150
  ;;
*) echo "usage: gemv-pdl.sh kernels|engine|single"; exit 2 ;;
esac
