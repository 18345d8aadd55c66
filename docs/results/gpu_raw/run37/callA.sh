# Run37 call A: split-K Pallas GEMM probe (sk_probe.py) at 64 rows.
set -u
O=$OUT; OUT=/tmp/o37A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
BUDGET=470 timeout 560 python tmp/run37/sk_probe.py $OUT > $OUT/sk.log 2>&1; echo "rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
rows=[json.loads(l) for l in open('/tmp/o37A/sk.jsonl')]
best={}
for r in rows:
  if r['kind']=='op':
    k=(r['model'],r['op'],r['impl'])
    if 'us' in r and (k not in best or r['us']<best[k]['us']): best[k]=r
for k,r in sorted(best.items()): print(k, round(r['us'],2), r.get('cfg'))
for r in rows:
  if r['kind'] in ('chain','chaincheck','check'): print(r['kind'], r.get('model'), r.get('op'), r.get('impl'), r.get('us'), r.get('lo'), r.get('hi'), r.get('rel'))
PY
tar czf $O/o37A.tgz -C /tmp o37A
