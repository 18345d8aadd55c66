# Run37 call F (the norms folded into the products): profile_step --device --gemm auto,xla
# at 64x512 (kernels a step), then engine_step --gemm auto,xla and xla,auto at 64x512.
set -u
O=$OUT; OUT=/tmp/o37F; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run37/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
timeout 200 python -m experiments.bench.profile_step --out $OUT/prof --device --gemm auto,xla --shapes 64x512 --steps 10 --top 16 > $OUT/prof.log 2>&1; echo "prof rc=$? $(( $(date +%s) - t0 ))s"
grep -A17 "kernels/step" $OUT/prof.log | head -80
left=$(( 560 - ($(date +%s) - t0) ))
timeout $left python -m experiments.bench.engine_step --out $OUT/es --gemm auto,xla --shapes 64x512 --big-pool-gb 1 --max-pool-gb 9 --repeats 11 --compilation-cache '' > $OUT/es.log 2>&1; echo "es rc=$? $(( $(date +%s) - t0 ))s"
left=$(( 560 - ($(date +%s) - t0) ))
timeout $left python -m experiments.bench.engine_step --out $OUT/es2 --gemm xla,auto --shapes 64x512 --big-pool-gb 1 --max-pool-gb 9 --repeats 11 --compilation-cache '' > $OUT/es2.log 2>&1; echo "es2 rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json, glob
for f in sorted(glob.glob('/tmp/o37F/es*/*.jsonl')):
  for l in open(f):
    r=json.loads(l)
    if 'paged_step_ms' in r: print(f.split('/')[-2], r['model'], r['batch'], r['context'], r['gemm'], r['pool_blocks'], 'paged', round(r['paged_step_ms'],3), round(r['paged_min_ms'],3), round(r['paged_max_ms'],3), 'dense', round(r['dense_step_ms'],3), 'roof', round(r['roofline_ms'],3), 'x', round(r['paged_over_roofline'],2), 'rate', round(r['read_tbs'],2))
PY
tar czf $O/o37F.tgz -C /tmp o37F
