# Run38 call C: the cascade's parts under XLA's command-buffer scheduling modes.
set -u
O=$OUT; OUT=/tmp/o38C; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
timeout 250 python -m tmp.run38.conc $OUT default > $OUT/default.log 2>&1; echo "default rc=$?"
XLA_FLAGS=--xla_gpu_command_buffer_scheduling_mode=CONCURRENT timeout 250 python -m tmp.run38.conc $OUT concurrent > $OUT/concurrent.log 2>&1; echo "concurrent rc=$?"
tail -3 $OUT/default.log $OUT/concurrent.log
python - <<'PY'
import json
for l in open('/tmp/o38C/conc.jsonl'):
  r=json.loads(l)
  print(r['tag'], r['case'], r['variant'], r.get('round'), r['call_us']['median'], (r['call_us']['min'], r['call_us']['max']), r.get('speedup'), 'ov', r.get('overlap_us'), 'busy', r.get('busy_us'), r.get('kernels'), r.get('rel_l2_vs_plain'))
PY
tar czf $O/o38C.tgz -C /tmp o38C
