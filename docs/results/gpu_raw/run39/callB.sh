# Run39 call B: SwiGLU's fused front against the current path (chain of every layer's MLP,
# cold L2), then the engine step's kernels with it patched in (on) and without (off).
set -u
O=$OUT; OUT=/tmp/o39B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run39/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
timeout 230 python -m tmp.run39.swiglu $OUT > $OUT/swiglu.log 2>&1; echo "swiglu rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for l in open('/tmp/o39B/swiglu.jsonl'):
  r = json.loads(l)
  if 'error' in r: print(r['case'], r['variant'], r['error'][:200]); continue
  t = r['per_layer_us']; print(r['case'], r['rows'], r['round'], r['variant'].ljust(22), t['median'], (t['ci_lo'], t['ci_hi']), 'err', round(r['rel_l2_vs_xla'], 4))
PY
for v in on off; do
  left=$(( 540 - ($(date +%s) - t0) )); [ $left -lt 40 ] && break
  if [ $v = on ]; then M="-m tmp.run39.fused experiments.bench.profile_step"; else M="-m experiments.bench.profile_step"; fi
  timeout $left python $M --out $OUT/p_$v --device --gemm auto --shapes 64x512 --steps 10 --top 60 --commit $PAXCACHE_COMMIT > $OUT/p_$v.log 2>&1; echo "prof $v rc=$? $(( $(date +%s) - t0 ))s"
  mv $OUT/p_$v/profile_device.json $OUT/p_${v}_$(date +%s).json 2>/dev/null
  grep -E "kernels/step" $OUT/p_$v.log
done
grep -E "ms  x" $OUT/p_on.log | head -40 | cut -c1-120
tar czf $O/o39B.tgz -C /tmp o39B
