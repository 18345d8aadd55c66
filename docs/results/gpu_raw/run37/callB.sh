# Run37 call B: the layer chain with project(gemm=auto) against xla at 8-256 rows (rows.py),
# then engine_step's paged and dense steps with --gemm auto,xla at 64x512 and 256x1024.
set -u
O=$OUT; OUT=/tmp/o37B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run37/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
timeout 200 python tmp/run37/rows.py $OUT > $OUT/rows.log 2>&1; echo "rows rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json, collections
rows=[json.loads(l) for l in open('/tmp/o37B/rows.jsonl')]
d=collections.defaultdict(list)
for r in rows: d[(r['model'],r['M'],r['gemm'])].append(r)
for k in sorted(d): print(k, [ (round(r['us'],1), round(r['lo'],1), round(r['hi'],1)) for r in d[k]], round(d[k][0]['rel_vs_xla'],4))
PY
left=$(( 570 - ($(date +%s) - t0) ))
timeout $left python -m experiments.bench.engine_step --out $OUT/es --gemm auto,xla --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 9 --repeats 11 --compilation-cache '' > $OUT/es.log 2>&1; echo "es rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json, glob
for f in glob.glob('/tmp/o37B/es/*.jsonl'):
  for l in open(f):
    r=json.loads(l)
    if 'paged_step_ms' in r: print(r['model'], r['batch'], r['context'], r['gemm'], r['pool_blocks'], 'paged', round(r['paged_step_ms'],3), round(r['paged_min_ms'],3), round(r['paged_max_ms'],3), 'dense', round(r['dense_step_ms'],3), 'roof', round(r['roofline_ms'],3), 'x', round(r['paged_over_roofline'],2), 'rate', round(r['read_tbs'],2))
PY
tail -3 $OUT/es.log
tar czf $O/o37B.tgz -C /tmp o37B
