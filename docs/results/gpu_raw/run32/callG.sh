# Run32 call G (H100): the split-K combine, old (reductions) against committed (split by
# split): the kernel alone, then SmolLM2's ShareGPT-like serving with bursts, alternating.
set -u
O=$OUT; OUT=/tmp/oG; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run32/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/smi.txt
SWEEP_OUT=$OUT timeout 120 python tmp/run32/combine_cost.py > $OUT/combine.log 2>&1; echo "combine rc=$? $(( $(date +%s) - t0 ))s"
grep -v "^I1205\|^W1205" $OUT/combine.log | cut -c1-260
E="python tmp/run32/with_combine.py experiments.bench.engine_step --no-step --e2e --async-scheduling --dispatch-thread --decode-steps 4 --models smollm2-135m --e2e-requests 192 --e2e-block-sizes 16 --e2e-pool-gb 12 --e2e-repeats 3 --compilation-cache /tmp/jcc --commit $C"
for r in new1 old1 new2 old2; do
  left=$(( 470 - ($(date +%s) - t0) )); [ $left -lt 80 ] && { echo "skip $r"; continue; }
  if [ ${r:0:3} = old ]; then export OLD_COMBINE=1; else unset OLD_COMBINE; fi
  timeout $left $E --out /tmp/e_$r > $OUT/share_$r.log 2>&1; echo "share $r rc=$? $(( $(date +%s) - t0 ))s"
  grep -E "^e2e|^combine" $OUT/share_$r.log | cut -c1-330
  sed "s/\"commit\"/\"combine\": \"${r:0:3}\", \"commit\"/" /tmp/e_$r/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl 2>/dev/null
done
tar czf $O/allG.tgz -C /tmp oG; cp $OUT/*.log $O/ 2>/dev/null; cp $OUT/*.jsonl $O/ 2>/dev/null; ls -la $O
