#!/usr/bin/env bash
# Run 16 as it ran (commit 3a2d0a7, since reverted: KVQ_GEMV_PF, KVQ_GEMV_WAVES=2 and KVQ_GEMV_ROWS no longer exist).
# The decode-step GEMV changes of run 16 against the binaries before them, in one call on a fresh
# machine: the GEMV's last partial batch of rows as one batch of loads and the next chunk's rows
# requested before its x is staged, L2 prefetch of weight rows ahead of the loads (KVQ_GEMV_PF rows),
# the all-waves split rule (KVQ_GEMV_WAVES=2), and every kernel a programmatic dependent by default
# (KVQ_PDL_ALL=0 to compare), and 4- and 8-row GEMVs (KVQ_GEMV_ROWS=8; gemm-bench times 8 rows too). Parity first (kvq-gpu check on the hq=8 third, engine-check,
# resident-check, under the new defaults and with prefetch and all-waves on), then gemm-bench per
# variant, then whole B=1 decode steps of the Llama-3-8B shape (random f16 GGUF written here, ~150 s),
# variants interleaved twice. It also starts the llama.cpp build, so that `bench-gpu.sh big-all` right
# after (machine still warm) finds it built and the GGUF written.
# Carry [".carry-bin", ".carry-bin-prev", ".carry-peers"] (.carry-bin-prev: kvq-prev.xz and
# kvq-gpu-prev.xz, the builds of the commit before). Results: $OUT/ab16.tar.gz.
set -uo pipefail
. "$(dirname "$0")/device-common.sh"
R=$OUT/ab16; mkdir -p "$R"
for b in kvq-prev kvq-gpu-prev; do xz -dc ".carry-bin-prev/$b.xz" > "$S/$b" && chmod +x "$S/$b"; done
cp -r .carry-peers/. "$S"/
big=$S/llama3-8b-f16.gguf
export -f random_gguf; export S
setsid nohup bash -c 'random_gguf llama3-8b "$0" "$1"' "$big" "$S/tokenizer.gguf" > "$S/gguf.log" 2>&1 < /dev/null &
setsid nohup nice -n 15 bash "$S/build-llamacpp-cuda.sh" "$S/llama-src.tar.gz" "$S/llama" > "$S/llama-build.log" 2>&1 < /dev/null &
save() { tar czf "$OUT/ab16.tar.gz" -C "$OUT" ab16; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
KVQ_CHECK_FILTER=${FILTER:-hq=8} timeout 150 "$S/kvq-gpu" check > "$R/check.txt" 2>&1; echo "check rc=$?"
grep -E "^parity" "$R/check.txt" | tail -1; grep "^FAIL" "$R/check.txt" | head -5
for v in default pf256-waves2-rows8; do
  e=(); [ $v != default ] && e=(KVQ_GEMV_PF=256 KVQ_GEMV_WAVES=2 KVQ_GEMV_ROWS=8)
  env "${e[@]}" timeout 90 "$S/kvq-gpu" engine-check > "$R/engine-$v.txt" 2>&1; echo "engine-check $v rc=$?"
  grep -E "^FAIL|checks" "$R/engine-$v.txt" | cut -c1-200 | head
done
timeout 90 "$S/kvq-gpu" resident-check > "$R/resident.txt" 2>&1; echo "resident-check rc=$?"
grep -E "^FAIL" "$R/resident.txt" | cut -c1-120 | head; grep -c "^PASS" "$R/resident.txt"; save
for v in pf0 pf256; do
  b=$S/kvq-gpu; e=(); [ $v = prev ] && b=$S/kvq-gpu-prev
  case $v in pf*) e=(KVQ_GEMV_PF=${v#pf}) ;; waves2) e=(KVQ_GEMV_WAVES=2 KVQ_GEMV_PF=256) ;; esac
  env "${e[@]}" timeout 90 "$b" gemm-bench > "$R/gemm-$v.txt" 2>&1; echo "== gemm-bench $v rc=$?"; grep -E "^\| [18] |^chain" "$R/gemm-$v.txt" | cut -c1-160
done; save
echo "== waiting for the 8B GGUF"; for i in $(seq 1 60); do grep -q wrote "$S/gguf.log" 2>/dev/null && break; sleep 3; done; cat "$S/gguf.log"
# Whole B=1 steps: prev (main before), pdl0 (new kernel, plain launches, no prefetch), new defaults,
# prefetch 256/512, all-waves with prefetch 256, decode splits of 128 tokens (B=1 4k: 256 by default); prev and pf256 twice, interleaved.
for rep in 1 2; do
  vs="prev pdl0 pf0 pf256 pf512 waves2 split128"; [ $rep = 2 ] && vs="pf256 prev"
  for v in $vs; do
    b=$S/kvq; e=(); [ $v = prev ] && b=$S/kvq-prev
    case $v in pdl0) e=(KVQ_PDL_ALL=0 KVQ_GEMV_PF=0) ;; pf*) e=(KVQ_GEMV_PF=${v#pf}) ;; waves2) e=(KVQ_GEMV_WAVES=2 KVQ_GEMV_PF=256) ;; split128) e=(KVQ_SPLIT_TOKENS=128) ;; esac
    env "${e[@]}" timeout 100 "$b" bench decode --model "$big" --ctx 4096 --batch 1 --steps 48 \
      --kv fp16 --kv kivi:bits=2,window=0 --json "$R/step-$v-$rep.json" > "$R/step-$v-$rep.log" 2>&1
    echo "== step $v rep $rep rc=$?"; grep "T=" "$R/step-$v-$rep.log" | sed 's/ graph nodes//; s/  */ /g' | cut -c1-200
  done
  rm -f "$R"/*.png; save
done
# B=8 steps through cuBLAS (default) and through the 8-row GEMV (KVQ_GEMV_ROWS=8).
for v in rows2 rows8; do
  KVQ_GEMV_ROWS=${v#rows} timeout 100 "$S/kvq" bench decode --model "$big" --ctx 4096 --batch 8 --steps 32 \
    --kv fp16 --kv kivi:bits=2,window=0 --json "$R/b8-$v.json" > "$R/b8-$v.log" 2>&1
  echo "== B=8 $v rc=$?"; grep "T=" "$R/b8-$v.log" | sed 's/ graph nodes//; s/  */ /g' | cut -c1-200
done
rm -f "$R"/*.png; save
# llama.cpp f16 at the same points (B=1 and 8, 4k), when its build is done: the same-run peer.
LB=$S/llama/build/bin
for i in $(seq 1 30); do [ -x "$LB/llama-batched-bench" ] && break; sleep 5; done
tail -n 2 "$S/llama-build.log"
for b in 1 8; do
  [ -x "$LB/llama-batched-bench" ] || break
  timeout 120 "$LB/llama-batched-bench" -m "$big" -ngl 99 -fa on -ctk f16 -ctv f16 -c $(( (4096 + 64) * b + 256 )) -b 2048 -ub 512 \
    -npp 4096 -ntg 64 -npl $b --output-format jsonl 2>>"$R/llama-f16.jsonl.err" | grep '^{' | tee -a "$R/llama-f16.jsonl" | cut -c1-300
done
save
