# Run32 call B (H100): deep-grid stages at head_dim 64 on this card, then the engine step table
# (issue 13 items 1 and 2) with pools that fit 80 GB.
set -u
O=$OUT; OUT=/tmp/oB; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run32/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $OUT/smi.txt
SWEEP_OUT=$OUT SWEEP_STAGES_ONLY=1 SWEEP_BUDGET=100 SWEEP_SHAPES="64,512,32,8;256,1024,32,8;32,2048,32,8;64,512,16,4;256,1024,16,4;64,512,32,16;256,1024,9,3;64,512,9,3" \
  timeout 130 python tmp/run32/sweep_small.py > $OUT/stages.log 2>&1; echo "stages rc=$? $(( $(date +%s) - t0 ))s"
cat $OUT/stages.log | cut -c1-140
left=$(( 570 - ($(date +%s) - t0) ))
timeout $left python -m experiments.bench.engine_step --out /tmp/es --repeats 11 --big-pool-gb 60 --max-pool-gb 62 --commit $C > $OUT/step.log 2>&1; echo "step rc=$? $(( $(date +%s) - t0 ))s"
tail -25 $OUT/step.log | cut -c1-220
cp /tmp/es/engine_step.jsonl $OUT/ 2>/dev/null
tar czf $O/allB.tgz -C /tmp oB; cp $OUT/*.log $OUT/*.jsonl $O/ 2>/dev/null; ls -la $O
