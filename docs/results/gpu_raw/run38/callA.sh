# Run38 call A: the split-K decode merged in the kernel (decode_merge="kernel") against
# XLA's merge and one split, at the engine's head_dim 64 shapes and 8 x 4096.
set -u
O=$OUT; OUT=/tmp/o38A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
BUDGET=470 timeout 560 python -m tmp.run38.kmerge $OUT > $OUT/kmerge.log 2>&1; echo "rc=$?"
tail -3 $OUT/kmerge.log
python - <<'PY'
import json
for l in open('/tmp/o38A/kmerge.jsonl'):
  r=json.loads(l)
  if r['case']=='read_ceiling': print('ceiling', r['bytes'], r['tbs'], r['call_us']); continue
  print(r['case'], r['variant'], r['round'], 's', r['splits'], 'one', r['call_us']['median'], (r['call_us']['min'], r['call_us']['max']), 'chain', r['chain_us_per_call']['median'], 'k/call', r['kernels_per_call'], 'err', r['max_abs_diff_vs_default'])
PY
tar czf $O/o38A.tgz -C /tmp o38A
