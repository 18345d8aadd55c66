# Run38 call B: the split-K decode at the engine's head_dim 64 shapes, cold L2 (8 pools)
# against warm (one pool), splits 1-4, steps 64/128, stages 2/3.
set -u
O=$OUT; OUT=/tmp/o38B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
BUDGET=480 timeout 570 python -m tmp.run38.cold $OUT > $OUT/cold.log 2>&1; echo "rc=$?"
tail -2 $OUT/cold.log
python - <<'PY'
import json
for l in open('/tmp/o38B/cold.jsonl'):
  r=json.loads(l)
  if r['case']=='read_ceiling': print('ceiling', r['tbs']); continue
  print(r['case'], r['variant'], r['round'], 's', r['splits'], 'st', r['stages'], 'cold', r['cold_us']['median'], (r['cold_us']['min'], r['cold_us']['max']), r['cold_tbs'], 'warm', r['warm_us']['median'], r['warm_tbs'])
PY
tar czf $O/o38B.tgz -C /tmp o38B
