set -u
O=$OUT; OUT=/tmp/oC; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT_DIR=$OUT
nvidia-smi --query-gpu=name --format=csv
timeout 200 python tmp/run33/casc_trace.py > $OUT/trace.log 2>&1; echo rc=$?
grep -E "^\{" $OUT/trace.log; grep -iE "error|Traceback" $OUT/trace.log | head
cp $OUT/trace.log $OUT/casc_trace.jsonl $O/ 2>/dev/null
