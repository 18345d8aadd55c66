# Run38 call H: the fused write's own row loaded before the key loop against after it.
set -u
O=$OUT; OUT=/tmp/o38H; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
timeout 500 python -m tmp.run38.prefetch $OUT > $OUT/prefetch.log 2>&1; echo "rc=$?"
grep -i "error\|Traceback" $OUT/prefetch.log | head -5
python - <<'PY'
import json
for l in open('/tmp/o38H/prefetch.jsonl'):
  r=json.loads(l); c=r['us_per_call']
  print(r['case'], r['variant'], r['round'], c['median'], (c['ci_lo'], c['ci_hi']), (c['min'], c['max']), r['tbs'], r['max_abs_diff_before_after'], r['max_abs_diff_vs_no_write'])
PY
tar czf $O/o38H.tgz -C /tmp o38H
