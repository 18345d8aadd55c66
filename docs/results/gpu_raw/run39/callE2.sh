# Run39 call E (tree 8260b88, the fused front in the model, rule of 32-128 rows on Hopper, 64-deep K
# steps in 4 stages): the MLP layer chain with the committed rule, then the engine step's
# kernels at 64 x 512 as committed.
set -u
O=$OUT; OUT=/tmp/o39E; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run39/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
SHAPE=smollm2 ROWS=32,64,128 timeout 60 python -m tmp.run39.swiglu $OUT/s > $OUT/s.log 2>&1; echo "s rc=$? $(( $(date +%s) - t0 ))s"
SHAPE=llama1b ROWS=32,64,128 timeout 60 python -m tmp.run39.swiglu $OUT/l > $OUT/l.log 2>&1; echo "l rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json, os
for f in ('/tmp/o39E/s/swiglu.jsonl', '/tmp/o39E/l/swiglu.jsonl'):
  if not os.path.exists(f): continue
  for l in open(f):
    r = json.loads(l)
    if 'error' in r: print(r['case'], r['rows'], r['variant'], r['error'][:150]); continue
    t = r['per_layer_us']; print(r['case'], r['rows'], r['round'], r['variant'].ljust(12), t['median'], (t['ci_lo'], t['ci_hi']), r['settings'])
PY
timeout $(( 200 - ($(date +%s) - t0) )) python -m experiments.bench.profile_step --out $OUT/p_on --device --gemm auto --shapes 64x512 --steps 10 --top 12 --commit $PAXCACHE_COMMIT > $OUT/p_on.log 2>&1; echo "prof rc=$? $(( $(date +%s) - t0 ))s"
grep -E "kernels/step" $OUT/p_on.log
tar czf $O/o39E.tgz -C /tmp o39E
