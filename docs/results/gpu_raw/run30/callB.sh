# Run30 call B: issue 15 item 1 persistent experiment (device time), cascade parts sweep (issue 16),
# and the plain async steady run as the depth-1 baseline for call A.
set -u
O=$OUT; OUT=/tmp/oB; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(git rev-parse --short HEAD 2>/dev/null || cat tmp/run30/commit); CC=/tmp/jcc
t0=$(date +%s)
# (scratch, not in the repo: a fused few-row GEMM probe; see README.md)
OUT=$OUT timeout 200 python tmp/skinny/bench.py 64 > $OUT/skinny.log 2>&1
echo "skinny rc=$? $(( $(date +%s) - t0 ))s"; python tmp/skinny/summ.py $OUT/skinny.log
PAXCACHE_COMMIT=$C timeout 170 python -m experiments.bench.gpu_ragged --nomosaic --no-peer --persistent 1,2:64:2,3:64:2 --device-time --out /tmp/persist > $OUT/persistent.log 2>&1
echo "persistent rc=$? $(( $(date +%s) - t0 ))s"; cp /tmp/persist/*.jsonl $OUT/ 2>/dev/null
grep -E "TB/s|persistent|planned|Error" $OUT/persistent.log | tail -40 | cut -c1-220
PAXCACHE_COMMIT=$C timeout 220 python -m experiments.bench.cascade --sweep --parts --out /tmp/cascade > $OUT/cascade.log 2>&1
echo "cascade rc=$? $(( $(date +%s) - t0 ))s"; cp /tmp/cascade/*.jsonl $OUT/ 2>/dev/null
grep -vE "^[WI]12" $OUT/cascade.log | tail -40 | cut -c1-250
tar czf $O/allB.tgz -C /tmp oB; cp $OUT/*.log $O/ 2>/dev/null; ls -la $O
