# Run38 call D: the cascade's parts on separate SMs (fewer shared chunks) under CONCURRENT,
# beside the same settings under the default scheduling.
set -u
O=$OUT; OUT=/tmp/o38D; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
XLA_FLAGS=--xla_gpu_command_buffer_scheduling_mode=CONCURRENT BUDGET=230 timeout 280 python -m tmp.run38.part $OUT concurrent > $OUT/concurrent.log 2>&1; echo "concurrent rc=$?"
BUDGET=200 timeout 260 python -m tmp.run38.part $OUT default > $OUT/default.log 2>&1; echo "default rc=$?"
grep -i "error\|Traceback" $OUT/*.log | head -5
python - <<'PY'
import json
for l in open('/tmp/o38D/part.jsonl'):
  r=json.loads(l)
  if 'error' in r: print(r['tag'], r['case'], r['variant'], 'ERROR', r['error'][:200]); continue
  c=r['call_us']; print(r['tag'][:4], r['case'][:9], r['variant'], r.get('round'), c['median'], c['min'], c['max'], r.get('speedup'), r.get('rel_l2_vs_plain'))
PY
tar czf $O/o38D.tgz -C /tmp o38D
