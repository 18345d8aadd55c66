# Run32 call C (H100): the Llama-1B step with DEEP_GRID_CARDS as committed (H200 + H100) and
# as before (H200 only), alternating processes; device profiles of the 64 x 512 step.
set -u
O=$OUT; OUT=/tmp/oC; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run32/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $OUT/smi.txt
W="python tmp/run32/with_cards.py"
for k in new old; do
  if [ $k = old ]; then export DEEP_CARDS="NVIDIA H200"; else unset DEEP_CARDS; fi
  timeout 90 $W experiments.bench.profile_step --out /tmp/p_$k --device --models llama-1b --shapes 64x512 --steps 10 --top 12 --commit $C > $OUT/profile_$k.log 2>&1; echo "profile $k rc=$? $(( $(date +%s) - t0 ))s"
  grep -A8 "kernels/step" $OUT/profile_$k.log | cut -c1-120
done
for i in 1 2; do for k in new old; do
  left=$(( 560 - ($(date +%s) - t0) )); [ $left -lt 60 ] && { echo "skip $k$i"; continue; }
  if [ $k = old ]; then export DEEP_CARDS="NVIDIA H200"; else unset DEEP_CARDS; fi
  timeout $left $W experiments.bench.engine_step --out /tmp/es_$k$i --models llama-1b --repeats 11 --big-pool-gb 20 --max-pool-gb 20 --commit $C > $OUT/step_${k}$i.log 2>&1; echo "step $k$i rc=$? $(( $(date +%s) - t0 ))s"
  grep -E "^llama" $OUT/step_${k}$i.log
  sed "s/\"commit\"/\"deep_grid_cards\": \"$k\", \"commit\"/" /tmp/es_$k$i/engine_step.jsonl >> $OUT/engine_step.jsonl 2>/dev/null
done; done
unset DEEP_CARDS
tar czf $O/allC.tgz -C /tmp oC; cp $OUT/*.log $O/ 2>/dev/null; cp $OUT/engine_step.jsonl $O/; ls -la $O
