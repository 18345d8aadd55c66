# Run35 call C (H200): the w64 large decode class at 64 x 512 beside 256 x 1024 on the H200
# (dec64.py, 1B heads); issue 13 item 1's step table at HEAD (64 x 512, live / 40x / 100 GB
# pools); the engine step with the w64 large class at 2 stages against the packaged table,
# alternating processes (with_table.py); the cascade's parts at HEAD.
set -u
O=$OUT; OUT=/tmp/o35C; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run35/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
timeout 100 python tmp/run35/dec64.py --classes decode/w64/i2/large --budget-s 40 --out $OUT/d32 > $OUT/dec64_32.log 2>&1; echo "d32 rc=$? $(( $(date +%s) - t0 ))s"
grep "^| decode" $OUT/dec64_32.log | sed 's/block 16 heads //; s/decode_//g' | cut -c1-150
timeout 200 python -m experiments.bench.engine_step --out $OUT/es --repeats 11 --shapes 64x512 --commit $PAXCACHE_COMMIT > $OUT/step.log 2>&1; echo "step rc=$? $(( $(date +%s) - t0 ))s"; tail -12 $OUT/step.log
for i in 1 2; do for v in pk st2; do
  left=$(( 470 - ($(date +%s) - t0) )); [ $left -gt 40 ] || break 2
  if [ $v = st2 ]; then export TABLE_OVERRIDE=tmp/run35/st2.json; else unset TABLE_OVERRIDE; fi
  timeout $left python tmp/run35/with_table.py experiments.bench.engine_step --out $OUT/ab_${v}_$i --repeats 11 --shapes 64x512,256x1024 --big-pool-gb 12 --max-pool-gb 12 --commit $PAXCACHE_COMMIT > $OUT/ab_${v}_$i.log 2>&1
  echo "ab $v $i rc=$? $(( $(date +%s) - t0 ))s"; grep -h "^table\|^smollm2\|^llama" $OUT/ab_${v}_$i.log | cut -c1-120 | tail -7
done; done
unset TABLE_OVERRIDE
left=$(( 570 - ($(date +%s) - t0) ))
[ $left -gt 50 ] && { timeout $left python -m experiments.bench.cascade --out $OUT/casc --parts > $OUT/cascade.log 2>&1; echo "casc rc=$? $(( $(date +%s) - t0 ))s"; tail -8 $OUT/cascade.log; }
tar czf $O/o35C.tgz -C /tmp o35C
