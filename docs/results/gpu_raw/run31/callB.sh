# Run31 call B: the same for the Llama-3.2-1B shape (its compiles are in call A's cache if the
# machine stayed), then SmolLM2's ShareGPT-like 192 requests with and without bursts (item 5).
set -u
O=$OUT; OUT=/tmp/oB; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run31/commit); CC=/tmp/jcc
t0=$(date +%s); nvidia-smi --query-gpu=name --format=csv | tee $OUT/smi.txt
E="python -m experiments.bench.engine_step --no-step --e2e --async-scheduling --compilation-cache $CC --e2e-steady 256x128+512 --e2e-only-steady --e2e-pool-gb 24 --capture-every 8"
BASE="--dispatch-thread --pipeline-depth 2"; B4="--dispatch-thread --decode-steps 4"
ls /tmp/jcc >/dev/null 2>&1 || echo "no compilation cache: a fresh machine"
i=0
for run in "llama-1b|$BASE" "llama-1b|$B4"; do
  i=$((i+1)); m=${run%%|*}; cfg=${run#*|}; left=$(( 330 - ($(date +%s) - t0) )); [ $left -lt 60 ] && { echo "skip $run"; continue; }
  timeout $left $E --models $m $cfg --e2e-repeats 3 --e2e-steps-out --commit $C --out /tmp/sb$i > $OUT/steady_$i.log 2>&1
  echo "steady $m '$cfg' rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/steady_$i.log | cut -c1-420
  cat /tmp/sb$i/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl 2>/dev/null; cp /tmp/sb$i/engine_steps.jsonl $OUT/engine_steps_$i.jsonl 2>/dev/null
done
S="python -m experiments.bench.engine_step --no-step --e2e --async-scheduling --compilation-cache $CC --models smollm2-135m --e2e-requests 192 --e2e-block-sizes 16 --e2e-pool-gb 12 --e2e-repeats 3"
j=2
for cfg in "$BASE" "$B4"; do
  j=$((j+1)); left=$(( 580 - ($(date +%s) - t0) )); [ $left -lt 60 ] && { echo "skip share $cfg"; continue; }
  timeout $left $S $cfg --commit $C --out /tmp/sb$j > $OUT/share_$j.log 2>&1
  echo "sharegpt '$cfg' rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/share_$j.log | cut -c1-420
  cat /tmp/sb$j/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl 2>/dev/null
done
tar czf $O/allB.tgz -C /tmp oB; cp $OUT/*.log $O/ 2>/dev/null; ls -la $O
