# Run38 call F: only on an H200 (else nothing): the cascade overlap (part2.py), then
# engine_step --gemm auto,xla at 64x512 and 256x1024 (issue 13 item 2 on its card).
set -u
O=$OUT; OUT=/tmp/o38F; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run38/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
if ! grep -q H200 $OUT/smi.txt; then echo "not an H200: nothing run"; exit 0; fi
t0=$(date +%s)
BUDGET=150 timeout 200 python -m tmp.run38.part2 $OUT > $OUT/part2.log 2>&1; echo "part2 rc=$? $(( $(date +%s) - t0 ))s"
left=$(( 560 - ($(date +%s) - t0) ))
timeout $left python -m experiments.bench.engine_step --out $OUT/es --gemm auto,xla --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 9 --repeats 11 --compilation-cache '' > $OUT/es.log 2>&1; echo "es rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json, glob
for l in open('/tmp/o38F/part2.jsonl'):
  r=json.loads(l); c=r['call_us']; print(r['case'][:9], r['variant'], r.get('round'), c['median'], (c['ci_lo'], c['ci_hi']), r.get('speedup'))
for f in sorted(glob.glob('/tmp/o38F/es/*.jsonl')):
  for l in open(f):
    r=json.loads(l)
    if 'paged_step_ms' in r: print(r['model'], r['batch'], r['context'], r['gemm'], r['pool_blocks'], 'paged', round(r['paged_step_ms'],3), round(r['paged_min_ms'],3), round(r['paged_max_ms'],3), 'dense', round(r['dense_step_ms'],3), 'roof', round(r['roofline_ms'],3), 'x', round(r['paged_over_roofline'],2), 'rate', round(r['read_tbs'],2))
PY
tar czf $O/o38F.tgz -C /tmp o38F
