set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run29/commit); CC=/tmp/jcc
t0=$(date +%s)
E="python -m experiments.bench.engine_step --no-step --e2e --async-scheduling --models smollm2-135m --compilation-cache $CC"
for b in 16 32 64 128; do
  timeout 200 $E --out /tmp/cc$b --e2e-requests 192 --e2e-block-sizes $b --e2e-pool-gb 12 --e2e-compile-only > /tmp/cc$b.log 2>&1 &
done
timeout 200 $E --out /tmp/ccs --e2e-steady 256x768+256 --e2e-only-steady --e2e-pool-gb 24 --e2e-compile-only > /tmp/ccs.log 2>&1 &
wait; echo "compile-only done $(( $(date +%s) - t0 ))s"; tail -1 /tmp/cc16.log | cut -c1-200; tail -1 /tmp/ccs.log | cut -c1-200
i=0
for cfg in "" "--dispatch-thread" "--dispatch-thread --pipeline-depth 2"; do
  i=$((i+1))
  timeout 150 $E --out /tmp/e2e$i --e2e-requests 192 --e2e-block-sizes 16,32,64,128 --e2e-pool-gb 12 --e2e-repeats 3 $cfg --commit $C > $OUT/e2e_$i.log 2>&1
  echo "e2e '$cfg' rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/e2e_$i.log | cut -c1-250
  cat /tmp/e2e$i/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl
done
i=0
for cfg in "" "--dispatch-thread --pipeline-depth 2" "--dispatch-thread"; do
  i=$((i+1))
  timeout 100 $E --out /tmp/st$i --e2e-steady 256x768+256 --e2e-only-steady --e2e-pool-gb 24 --e2e-repeats 3 $cfg --commit $C > $OUT/steady_$i.log 2>&1
  echo "steady '$cfg' rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/steady_$i.log | cut -c1-250
  cat /tmp/st$i/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl
done
