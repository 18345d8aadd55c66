# Run33 call D: the cascade with the elementwise merge (new) against the old merge, device
# time per call (call_spans), alternating processes; then both cases with --parts (new).
set -u
O=$OUT; OUT=/tmp/oD; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
export PAXCACHE_COMMIT=$(cat tmp/run33/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $OUT/smi.txt
for i in 1 2; do for k in new old; do
  left=$(( 330 - ($(date +%s) - t0) )); [ $left -lt 40 ] && { echo "skip $k$i"; continue; }
  if [ $k = old ]; then export OLD_MERGE=1; else unset OLD_MERGE; fi
  timeout $left python tmp/run33/with_merge.py experiments.bench.cascade --cases 100x5000 --out /tmp/c_$k$i > $OUT/ab_$k$i.log 2>&1
  echo "$k$i rc=$? $(( $(date +%s) - t0 ))s"; grep -E "default:" $OUT/ab_$k$i.log
  sed "s/\"commit\"/\"merge\": \"$k\", \"commit\"/" /tmp/c_$k$i/cascade.jsonl >> $OUT/cascade_ab.jsonl 2>/dev/null
done; done
unset OLD_MERGE
left=$(( 480 - ($(date +%s) - t0) ))
timeout $left python -m experiments.bench.cascade --parts --out /tmp/c_parts > $OUT/parts.log 2>&1; echo "parts rc=$? $(( $(date +%s) - t0 ))s"
grep -vE "^[WI]12" $OUT/parts.log | tail -12 | cut -c1-330
cp /tmp/c_parts/cascade.jsonl $OUT/cascade_parts.jsonl 2>/dev/null
tar czf $O/allD.tgz -C /tmp oD; cat $OUT/*.log > $O/all.log; cp $OUT/*.jsonl $O/ 2>/dev/null; ls -la $O
