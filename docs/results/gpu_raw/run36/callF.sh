# Run36 call F (HEAD after the review fixes): merge_ab.py, the kernels of one
# cascade call (trace.py), and the cascade benchmark.
set -u
O=$OUT; OUT=/tmp/o36F; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run36/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
OUT_DIR=$OUT timeout 200 python tmp/run36/trace.py > $OUT/trace.log 2>&1; echo "trace rc=$?"; grep -v Warn $OUT/trace.log
OUT_DIR=$OUT timeout 300 python tmp/run36/merge_ab.py > $OUT/merge_ab.log 2>&1; echo "ab rc=$? $(( $(date +%s) - t0 ))s"; grep " r[0-9] " $OUT/merge_ab.log
left=$(( 560 - ($(date +%s) - t0) ))
[ $left -gt 60 ] && { timeout $left python -m experiments.bench.cascade --out $OUT/casc --parts > $OUT/cascade.log 2>&1; echo "casc rc=$? $(( $(date +%s) - t0 ))s"; tail -4 $OUT/cascade.log; }
tar czf $O/o36F.tgz -C /tmp o36F
