set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
t0=$(date +%s)
timeout 540 python -m experiments.bench.cascade --sweep --parts --out /tmp/cascade > $OUT/cascade.log 2>&1
echo "cascade rc=$? $(( $(date +%s) - t0 ))s"
cp /tmp/cascade/*.jsonl $OUT/ 2>/dev/null
grep -vE "^[WI]1205" $OUT/cascade.log | tail -60 | cut -c1-250
