# Run33 call H (an H200 if one comes): issue 13 item 3 with decode bursts, both shapes.
set -u
O=$OUT; OUT=/tmp/oH; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run33/commit); CC=/tmp/jcc
t0=$(date +%s); nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $OUT/smi.txt
E="python -m experiments.bench.engine_step --no-step --e2e --async-scheduling --compilation-cache $CC --e2e-steady 256x128+512 --e2e-only-steady --e2e-pool-gb 24 --capture-every 8 --e2e-repeats 3 --e2e-steps-out"
B4="--dispatch-thread --decode-steps 4"
i=0
for m in smollm2-135m llama-1b; do
  i=$((i+1)); left=$(( 250 - ($(date +%s) - t0) )); [ $left -lt 60 ] && { echo "skip $m"; continue; }
  timeout $left $E --models $m $B4 --commit $C --out /tmp/se$i > $OUT/steady_$i.log 2>&1
  echo "steady $m rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/steady_$i.log | cut -c1-600
  cat /tmp/se$i/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl 2>/dev/null; cp /tmp/se$i/engine_steps.jsonl $OUT/engine_steps_$i.jsonl 2>/dev/null
done
tar czf $O/allH.tgz -C /tmp oH; cat $OUT/*.log > $O/all.log; cp $OUT/engine_e2e.jsonl $O/ 2>/dev/null; ls -la $O
