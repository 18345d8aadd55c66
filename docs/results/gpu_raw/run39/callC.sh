# Run39 call C: the fused front at 8, 16, 32 rows (SmolLM2), then engine_step's paged step
# at 64 x 512 for SmolLM2 with the fused front patched in (on) and without (off), alternating.
set -u
O=$OUT; OUT=/tmp/o39C; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run39/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
ROWS=8,16,32 timeout 100 python -m tmp.run39.swiglu $OUT > $OUT/swiglu.log 2>&1; echo "swiglu rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for l in open('/tmp/o39C/swiglu.jsonl'):
  r = json.loads(l); t = r['per_layer_us']; print(r['case'], r['rows'], r['round'], r['variant'].ljust(12), t['median'], (t['ci_lo'], t['ci_hi']))
PY
for v in on off on off; do
  left=$(( 400 - ($(date +%s) - t0) )); [ $left -lt 60 ] && break
  if [ $v = on ]; then M="-m tmp.run39.fused experiments.bench.engine_step"; else M="-m experiments.bench.engine_step"; fi
  timeout $left python $M --out $OUT/es_$v --models smollm2-135m --shapes 64x512 --big-pool-gb 1 --max-pool-gb 2 --repeats 11 --compilation-cache '' --commit $PAXCACHE_COMMIT > $OUT/es_$v.log 2>&1; echo "es $v rc=$? $(( $(date +%s) - t0 ))s"
  for f in $OUT/es_$v/*.jsonl; do mv $f ${f%.jsonl}_$(date +%s%N).jsonl; done
  grep -E "paged|roofline" $OUT/es_$v.log | tail -4 | cut -c1-200
done
tar czf $O/o39C.tgz -C /tmp o39C
