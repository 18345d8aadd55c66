# Run38 call E: the cascade's parts overlapped, confirmation (CONCURRENT per jit), 4 rounds.
set -u
O=$OUT; OUT=/tmp/o38E; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
BUDGET=430 timeout 520 python -m tmp.run38.part2 $OUT > $OUT/part2.log 2>&1; echo "rc=$?"
grep -i "error\|Traceback" $OUT/part2.log | head -5
python - <<'PY'
import json, collections
d=collections.defaultdict(list)
for l in open('/tmp/o38E/part2.jsonl'):
  r=json.loads(l); c=r['call_us']
  print(r['case'][:9], r['variant'], r.get('round'), c['median'], (c['ci_lo'], c['ci_hi']), (c['min'], c['max']), r.get('speedup'))
PY
tar czf $O/o38E.tgz -C /tmp o38E
