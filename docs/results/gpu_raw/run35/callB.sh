# Run35 call B: the cascade's own part split over each row's own range (ed36869) against
# one split, alone and in the cascade (own_split.py); the decode's w64 large class at the
# engine's 64 x 512 beside 256 x 1024, 1B heads then SmolLM2 heads (dec64.py).
set -u
O=$OUT; OUT=/tmp/o35B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(git rev-parse --short HEAD 2>/dev/null || cat tmp/run35/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
OUT_DIR=$OUT timeout 270 python tmp/run35/own_split.py > $OUT/own_split.log 2>&1; echo "own rc=$? $(( $(date +%s) - t0 ))s"
grep -v "^I1\|^W1\|tpu" $OUT/own_split.log | tail -48
left=$(( 540 - ($(date +%s) - t0) ))
[ $left -gt 60 ] && { timeout $left python tmp/run35/dec64.py --classes decode/w64/i2/large --budget-s 110 --out $OUT/d32 > $OUT/dec64_32.log 2>&1; echo "d32 rc=$? $(( $(date +%s) - t0 ))s"; grep "^| decode" $OUT/dec64_32.log | sed 's/block 16 heads //'; }
left=$(( 560 - ($(date +%s) - t0) ))
[ $left -gt 60 ] && { HEADS=9/3 timeout $left python tmp/run35/dec64.py --classes decode/w64/i2/large --budget-s 80 --out $OUT/d9 > $OUT/dec64_9.log 2>&1; echo "d9 rc=$? $(( $(date +%s) - t0 ))s"; grep "^| decode" $OUT/dec64_9.log | sed 's/block 16 heads //'; }
tar czf $O/o35B.tgz -C /tmp o35B
