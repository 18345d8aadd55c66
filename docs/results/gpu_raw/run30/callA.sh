# Run30 call A: issue 13 item 3, steady batch 256 with traced device time, depth 2 + dispatch thread.
set -u
O=$OUT; OUT=/tmp/oA; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(git rev-parse --short HEAD 2>/dev/null || cat tmp/run30/commit); CC=/tmp/jcc
t0=$(date +%s); nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $OUT/smi.txt
python -c "import jax; print(jax.__version__, jax.devices())"
E="python -m experiments.bench.engine_step --no-step --e2e --async-scheduling --compilation-cache $CC --e2e-steady 256x128+512 --e2e-only-steady --e2e-pool-gb 24 --capture-every 8"
for m in smollm2-135m llama-1b; do
  timeout 200 $E --models $m --out /tmp/cc_$m --e2e-compile-only > /tmp/cc_$m.log 2>&1 &
done
wait; echo "compile-only done $(( $(date +%s) - t0 ))s"; tail -2 /tmp/cc_*.log | cut -c1-200
i=0
for run in "smollm2-135m|--dispatch-thread --pipeline-depth 2" "llama-1b|--dispatch-thread --pipeline-depth 2"; do
  i=$((i+1)); m=${run%%|*}; cfg=${run#*|}
  timeout 140 $E --models $m --e2e-repeats 3 $cfg --e2e-steps-out --commit $C --out /tmp/st$i > $OUT/steady_$i.log 2>&1
  echo "steady $m '$cfg' rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/steady_$i.log | cut -c1-400
  cat /tmp/st$i/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl; cp /tmp/st$i/engine_steps.jsonl $OUT/engine_steps_$i.jsonl
done
tail -5 $OUT/steady_*.log | cut -c1-300
tar czf $O/allA.tgz -C /tmp oA; cp $OUT/*.log $O/ 2>/dev/null; ls -la $O
