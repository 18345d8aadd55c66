# Run35 call A (plan, H200): a plain read's rate against its size; issue 13 item 1's step
# table at 64 x 512 (live / 40x / 100 GB pools) at HEAD; the cascade's speedups at HEAD
# as device time, with the parts.
set -u
O=$OUT; OUT=/tmp/o35A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run35/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
OUT_DIR=$OUT timeout 60 python tmp/run35/read_sizes.py > $OUT/read_sizes.log 2>&1; echo "read rc=$? $(( $(date +%s) - t0 ))s"
timeout 300 python -m experiments.bench.engine_step --out $OUT/es --repeats 11 --shapes 64x512 --commit $PAXCACHE_COMMIT > $OUT/step.log 2>&1; echo "step rc=$? $(( $(date +%s) - t0 ))s"; tail -15 $OUT/step.log
left=$(( 560 - ($(date +%s) - t0) ))
[ $left -gt 60 ] && { timeout $left python -m experiments.bench.cascade --out $OUT/casc --parts > $OUT/cascade.log 2>&1; echo "casc rc=$? $(( $(date +%s) - t0 ))s"; tail -8 $OUT/cascade.log; }
tar czf $O/o35A.tgz -C /tmp o35A
