# Run41 call C: the decode step's kernels at 64x512 over bf16, int8 (rotated) and e4m3 caches
# (both models, profile_step --device --kv-dtype), after the 8-bit fused write.
set -u
O=$OUT; OUT=/tmp/o41C; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run41/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
for kv in bfloat16 int8 float8_e4m3fn; do
  f=""; [ $kv != bfloat16 ] && f="--kv-dtype $kv"
  timeout 150 python -m experiments.bench.profile_step --out $OUT/p_$kv --device --gemm auto --shapes 64x512 --steps 10 --top 16 $f --commit $PAXCACHE_COMMIT > $OUT/p_$kv.log 2>&1; echo "$kv rc=$? $(( $(date +%s) - t0 ))s"
  grep -E "kernels/step|  [0-9]" $OUT/p_$kv.log | head -40
done
tar czf $O/o41C.tgz -C /tmp o41C
