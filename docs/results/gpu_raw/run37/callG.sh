# Run37 call G (61f876c, the product without the fold): profile_step --device --gemm
# auto,xla at 64x512, then the engine end to end for SmolLM2's shape (ShareGPT-like, async
# scheduling, dispatch thread, bursts of 4) with --gemm auto, then --gemm xla.
set -u
O=$OUT; OUT=/tmp/o37G; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run37/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
timeout 120 python -m experiments.bench.profile_step --out $OUT/prof --device --gemm auto,xla --shapes 64x512 --steps 10 --top 16 > $OUT/prof.log 2>&1; echo "prof rc=$? $(( $(date +%s) - t0 ))s"
grep "kernels/step" $OUT/prof.log
for g in auto xla; do
  left=$(( 430 - ($(date +%s) - t0) ))
  [ $left -gt 60 ] && { timeout $left python -m experiments.bench.engine_step --out $OUT/e2e_$g --no-step --e2e --async-scheduling --dispatch-thread --decode-steps 4 --models smollm2-135m --e2e-requests 192 --e2e-repeats 3 --e2e-pool-gb 24 --gemm $g --compilation-cache /tmp/jcc > $OUT/e2e_$g.log 2>&1; echo "$g rc=$? $(( $(date +%s) - t0 ))s"; }
done
python - <<'PY'
import json, glob
for f in sorted(glob.glob('/tmp/o37G/e2e_*/engine_e2e.jsonl')):
  for l in open(f):
    r=json.loads(l)
    print(f.split('/')[-2], r['model'], 'tok/s', round(r['tokens_per_s']), round(r['tokens_per_s_min']), round(r['tokens_per_s_max']), 'step', r.get('decode_step_ms'), 'dev', r.get('decode_device_ms'), 'batch', r.get('mean_decode_batch'), 'compile', r.get('compile_s'), r.get('gemm'))
PY
tar czf $O/o37G.tgz -C /tmp o37G
