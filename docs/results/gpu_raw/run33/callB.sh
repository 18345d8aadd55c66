# Run33 call B: the SmolLM2 step's kernels with and without exhaustive tiling search
# (profile_step --device through with_opts.py), then the cascade probe at 100 x 5k.
set -u
O=$OUT; OUT=/tmp/oB; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT_DIR=$OUT
C=$(cat tmp/run33/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $OUT/smi.txt
timeout 200 python tmp/run33/casc_probe.py 100x5000 > $OUT/casc.log 2>&1; echo "casc rc=$? $(( $(date +%s) - t0 ))s"
grep -E "^\{" $OUT/casc.log | cut -c1-330
for o in default exh; do
  left=$(( 560 - ($(date +%s) - t0) )); [ $left -lt 60 ] && { echo "skip $o"; continue; }
  STEP_OPTS=$o timeout $left python tmp/run33/with_opts.py experiments.bench.profile_step --out /tmp/p_$o --device --models smollm2-135m --shapes 64x512 --steps 10 --top 14 --commit $C > $OUT/profile_$o.log 2>&1; echo "profile $o rc=$? $(( $(date +%s) - t0 ))s"
  grep -A15 "kernels/step" $OUT/profile_$o.log | cut -c1-120
done
tar czf $O/allB.tgz -C /tmp oB; cat $OUT/*.log > $O/all.log; cp $OUT/*.jsonl $O/ 2>/dev/null; ls -la $O
