# Run39 call E (tree c045b76, the fused front in the model): the MLP layer chain at every
# row count with the committed rule, then the engine step's kernels and paged step at
# 64 x 512 with the model as committed (on) and SwiGLU's old front (off, unfused.py).
set -u
O=$OUT; OUT=/tmp/o39E; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run39/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
SHAPE=smollm2 ROWS=8,16,32,64,128 timeout 90 python -m tmp.run39.swiglu $OUT/s > $OUT/s.log 2>&1; echo "s rc=$? $(( $(date +%s) - t0 ))s"
SHAPE=llama1b ROWS=16,32,64,128 timeout 90 python -m tmp.run39.swiglu $OUT/l > $OUT/l.log 2>&1; echo "l rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for f in ('/tmp/o39E/s/swiglu.jsonl', '/tmp/o39E/l/swiglu.jsonl'):
  for l in open(f):
    r = json.loads(l)
    if 'error' in r: print(r['case'], r['rows'], r['variant'], r['error'][:150]); continue
    t = r['per_layer_us']; print(r['case'], r['rows'], r['round'], r['variant'].ljust(12), t['median'], (t['ci_lo'], t['ci_hi']), r['settings'])
PY
for v in on off; do
  if [ $v = on ]; then M="-m experiments.bench.profile_step"; else M="-m tmp.run39.unfused experiments.bench.profile_step"; fi
  timeout 120 python $M --out $OUT/p_$v --device --gemm auto --shapes 64x512 --steps 10 --top 12 --commit $PAXCACHE_COMMIT > $OUT/p_$v.log 2>&1; echo "prof $v rc=$? $(( $(date +%s) - t0 ))s"
  grep -E "kernels/step" $OUT/p_$v.log
done
for v in on off on off; do
  left=$(( 300 - ($(date +%s) - t0) )); [ $left -lt 60 ] && break
  if [ $v = on ]; then M="-m experiments.bench.engine_step"; else M="-m tmp.run39.unfused experiments.bench.engine_step"; fi
  timeout $left python $M --out $OUT/es_$v --shapes 64x512 --big-pool-gb 1 --max-pool-gb 2 --repeats 11 --compilation-cache '' --commit $PAXCACHE_COMMIT > $OUT/es_$v.log 2>&1; echo "es $v rc=$? $(( $(date +%s) - t0 ))s"
  mkdir -p $OUT/es_runs; n=$(ls $OUT/es_runs | wc -l); cp $OUT/es_$v/engine_step.jsonl $OUT/es_runs/${n}_$v.jsonl 2>/dev/null; rm -rf $OUT/es_$v
  python - $OUT/es_runs/${n}_$v.jsonl <<'PY'
import json, sys
for l in open(sys.argv[1]):
  r = json.loads(l)
  if 'paged_step_ms' in r: print(r['model'], r['pool_blocks'], round(r['paged_step_ms'], 4), round(r['paged_min_ms'], 4), round(r['paged_max_ms'], 4), 'x', round(r['paged_over_roofline'], 2))
PY
done
tar czf $O/o39E.tgz -C /tmp o39E
