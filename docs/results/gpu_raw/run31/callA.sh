# Run31 call A: issue 13 item 3 at a steady batch of 256: decode bursts (EngineConfig.decode_steps)
# against the two-steps-unread baseline, SmolLM2 shape; then where the host's time goes.
set -u
O=$OUT; OUT=/tmp/oA; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run31/commit); CC=/tmp/jcc
t0=$(date +%s); nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $OUT/smi.txt
python -c "import jax; print(jax.__version__, jax.devices())"
E="python -m experiments.bench.engine_step --no-step --e2e --async-scheduling --compilation-cache $CC --e2e-steady 256x128+512 --e2e-only-steady --e2e-pool-gb 24 --capture-every 8"
BASE="--dispatch-thread --pipeline-depth 2"; B4="--dispatch-thread --decode-steps 4"; B8="--dispatch-thread --decode-steps 8"
n=0
for m in smollm2-135m llama-1b; do for cfg in "$BASE" "$B4" "$B8"; do
  n=$((n+1)); timeout 240 $E --models $m $cfg --out /tmp/cc_$n --e2e-compile-only > /tmp/cc_$n.log 2>&1 &
done; done
wait; echo "compile-only done $(( $(date +%s) - t0 ))s"; tail -qn1 /tmp/cc_*.log | cut -c1-200
i=0
for run in "smollm2-135m|$BASE" "smollm2-135m|$B4" "smollm2-135m|$B8"; do
  i=$((i+1)); m=${run%%|*}; cfg=${run#*|}; left=$(( 575 - ($(date +%s) - t0) )); [ $left -lt 60 ] && { echo "skip $run"; continue; }
  timeout $left $E --models $m $cfg --e2e-repeats 3 --e2e-steps-out --commit $C --out /tmp/st$i > $OUT/steady_$i.log 2>&1
  echo "steady $m '$cfg' rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/steady_$i.log | cut -c1-420
  cat /tmp/st$i/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl 2>/dev/null; cp /tmp/st$i/engine_steps.jsonl $OUT/engine_steps_$i.jsonl 2>/dev/null
done
tail -3 $OUT/steady_*.log | cut -c1-300
tar czf $O/allA.tgz -C /tmp oA; cp $OUT/*.log $O/ 2>/dev/null; ls -la $O
