# Run36 call A (H200): the cascade with the merge in the own part's kernel against the old
# composition (merge_ab.py), then the cascade benchmark with the parts at this commit.
set -u
O=$OUT; OUT=/tmp/o36A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run36/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
OUT_DIR=$OUT timeout 300 python tmp/run36/merge_ab.py > $OUT/merge_ab.log 2>&1; echo "ab rc=$? $(( $(date +%s) - t0 ))s"; grep -v "^{" $OUT/merge_ab.log | tail -30
left=$(( 560 - ($(date +%s) - t0) ))
[ $left -gt 60 ] && { timeout $left python -m experiments.bench.cascade --out $OUT/casc --parts > $OUT/cascade.log 2>&1; echo "casc rc=$? $(( $(date +%s) - t0 ))s"; tail -8 $OUT/cascade.log; }
tar czf $O/o36A.tgz -C /tmp o36A
