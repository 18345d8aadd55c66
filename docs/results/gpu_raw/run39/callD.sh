# Run39 call D: the fused front for the 1B shape's gate/up (64 MiB) at 16-128 rows.
set -u
O=$OUT; OUT=/tmp/o39D; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run39/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
SHAPE=llama1b ROWS=16,32,64,128 EXTRA=1 timeout 200 python -m tmp.run39.swiglu $OUT > $OUT/swiglu.log 2>&1; echo "swiglu rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for l in open('/tmp/o39D/swiglu.jsonl'):
  r = json.loads(l); t = r['per_layer_us']; print(r['case'], r['rows'], r['round'], r['variant'].ljust(18), t['median'], (t['ci_lo'], t['ci_hi']), r['settings'])
PY
tar czf $O/o39D.tgz -C /tmp o39D
