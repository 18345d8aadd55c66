# Run37 call H (61f876c): the engine end to end for the 1B shape (ShareGPT-like, 128
# requests, async scheduling, dispatch thread, bursts of 4), --gemm auto then --gemm xla.
set -u
O=$OUT; OUT=/tmp/o37H; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run37/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
for g in auto xla; do
  left=$(( 235 - ($(date +%s) - t0) ))
  [ $left -gt 60 ] && { timeout $left python -m experiments.bench.engine_step --out $OUT/e2e_$g --no-step --e2e --async-scheduling --dispatch-thread --decode-steps 4 --models llama-1b --e2e-requests 128 --e2e-repeats 2 --e2e-pool-gb 24 --gemm $g --compilation-cache /tmp/jcc > $OUT/e2e_$g.log 2>&1; echo "$g rc=$? $(( $(date +%s) - t0 ))s"; }
done
python - <<'PY'
import json, glob
for f in sorted(glob.glob('/tmp/o37H/e2e_*/engine_e2e.jsonl')):
  for l in open(f):
    r=json.loads(l)
    print(f.split('/')[-2], r['model'], 'tok/s', round(r['tokens_per_s']), round(r['tokens_per_s_min']), round(r['tokens_per_s_max']), 'step', r.get('decode_step_ms'), 'dev', r.get('decode_device_ms'), 'batch', r.get('mean_decode_batch'), 'compile', r.get('compile_s'), r.get('gemm'))
PY
tar czf $O/o37H.tgz -C /tmp o37H
