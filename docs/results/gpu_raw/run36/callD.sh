# Run36 call D: with the prefix partials loaded before the key loop, merge_ab.py again, the kernels of one
# cascade call (trace.py).
set -u
O=$OUT; OUT=/tmp/o36D; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run36/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
OUT_DIR=$OUT timeout 200 python tmp/run36/trace.py > $OUT/trace.log 2>&1; echo "trace rc=$?"; grep -v Warn $OUT/trace.log | grep -v "^   .*fusion"
OUT_DIR=$OUT timeout 300 python tmp/run36/merge_ab.py > $OUT/merge_ab.log 2>&1; echo "ab rc=$? $(( $(date +%s) - t0 ))s"; grep " r[0-9] " $OUT/merge_ab.log
left=$(( 560 - ($(date +%s) - t0) ))
tar czf $O/o36D.tgz -C /tmp o36D
