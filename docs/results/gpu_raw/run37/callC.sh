# Run37 call C: each projection with its consumer at 8-256 rows, the rule and its neighbours
# against XLA (ops.py).
set -u
O=$OUT; OUT=/tmp/o37C; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
timeout 560 python tmp/run37/ops.py $OUT > $OUT/ops.log 2>&1; echo "ops rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json, collections
rows=[json.loads(l) for l in open('/tmp/o37C/ops.jsonl') if '"us"' in l]
d=collections.defaultdict(list)
for r in rows: d[(r['model'],r['op'],r['M'])].append(r)
for k in d:
  xs=[r['us'] for r in d[k] if r['impl']=='xla']
  rule=[r['us'] for r in d[k] if r.get('rule')]
  best=min((r for r in d[k] if r['impl']=='pallas'), key=lambda r:r['us'], default=None)
  print(k, 'xla', [round(v,2) for v in xs], 'rule', [round(v,2) for v in rule], 'best', round(best['us'],2) if best else None, best and best['cfg'])
PY
tar czf $O/o37C.tgz -C /tmp o37C
