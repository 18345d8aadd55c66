# Run38 call K: the planned decode's fused write, own row before / after the key loop.
set -u
O=$OUT; OUT=/tmp/o38K; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
timeout 500 python -m tmp.run38.pprefetch $OUT > $OUT/pprefetch.log 2>&1; echo "rc=$?"
grep -i "error\|Traceback" $OUT/pprefetch.log | head -5
python - <<'PY'
import json
for l in open('/tmp/o38K/pprefetch.jsonl'):
  r=json.loads(l); c=r['us_per_call']
  print(r['case'], r['heads'], r['variant'], r['round'], c['median'], (c['ci_lo'], c['ci_hi']), r['tbs'], r['max_abs_diff'], r['chunks'])
PY
tar czf $O/o38K.tgz -C /tmp o38K
