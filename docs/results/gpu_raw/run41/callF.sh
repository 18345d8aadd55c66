# Run41 call F: the int8 decode kernel with and without the write inside (1B layer shape),
# defaults and other stages / steps, 256 x 1024 then 64 x 512.
set -u
O=$OUT; OUT=/tmp/o41F; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
grep -q H200 $OUT/smi.txt && timeout 150 python -m tmp.run41.fw_kernel $OUT/k 256x1024 write,fused,fused-2st,fused-4w-2st-t64 2 > $OUT/k.log 2>&1; echo "k rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for l in open('/tmp/o41F/k/fw_kernel.jsonl'):
  r = json.loads(l); print(r['round'], r['batch'], r['context'], r['variant'], round(r['ms'], 4), round(r['min_ms'], 4), round(r['max_ms'], 4))
PY
tar czf $O/o41F.tgz -C /tmp o41F
