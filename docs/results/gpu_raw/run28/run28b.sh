set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run28/commit)
t0=$(date +%s)
for b in 16 32 64 128; do
  timeout 200 python -m experiments.bench.engine_step --out /tmp/cc$b --no-step --e2e --async-scheduling \
    --models smollm2-135m --e2e-requests 192 --e2e-block-sizes $b --e2e-pool-gb 12 --e2e-compile-only > /tmp/cc$b.log 2>&1 &
done
wait; echo "compile-only done $(( $(date +%s) - t0 ))s"; tail -2 /tmp/cc16.log
timeout 400 python -m experiments.bench.engine_step --out $OUT/e2e --no-step --e2e --async-scheduling \
  --models smollm2-135m --e2e-requests 192 --e2e-block-sizes 16,32,64,128 --e2e-pool-gb 12 --commit $C > $OUT/e2e.log 2>&1
echo "e2e rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e|tokens/s" $OUT/e2e.log | cut -c1-250
