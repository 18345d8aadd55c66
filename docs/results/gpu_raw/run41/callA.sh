# Run41 call A (H200 wanted): issue 13 items 1 and 2 at HEAD on the H200 (both models, 64x512
# and 256x1024, live / 40x / 100 GB pools), and the step's kernels at 64x512. On an H100:
# nothing (its figures decide no bar and run40 has them).
set -u
O=$OUT; OUT=/tmp/o41A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run41/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
left() { echo $(( 570 - ($(date +%s) - t0) )); }
if grep -q H200 $OUT/smi.txt; then
timeout $(( $(left) - 120 )) python -m experiments.bench.engine_step --out $OUT/es --shapes 64x512,256x1024 --repeats 11 --compilation-cache '' > $OUT/es.log 2>&1; echo "es rc=$? $(( $(date +%s) - t0 ))s"; tail -14 $OUT/es.log
[ $(left) -gt 70 ] && { timeout $(left) python -m experiments.bench.profile_step --out $OUT/prof --device --gemm auto --shapes 64x512 --steps 10 --top 20 --commit $PAXCACHE_COMMIT > $OUT/prof.log 2>&1; echo "prof rc=$? $(( $(date +%s) - t0 ))s"; grep -E "kernels/step|kernel ms" $OUT/prof.log | head; }
fi
tar czf $O/o41A.tgz -C /tmp o41A
