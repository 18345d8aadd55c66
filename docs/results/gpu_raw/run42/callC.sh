# Run42 call C (H200; call B cut to what the session's last device time holds): the engine's
# 8-bit step with the write in the kernel (HEAD: no rotation inside) and without, bf16
# beside them, 256 x 1024 first (both models), then 64 x 512 as time allows.
set -u
O=$OUT; OUT=/tmp/o42C; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
grep -q H200 $OUT/smi.txt || { echo "not an H200: nothing timed"; tar czf $O/o42C.tgz -C /tmp o42C; exit 0; }
QW_BIG_FIRST=1 timeout 170 python -m tmp.run42.qw_step $OUT/qw 140 int8-rot-fused,int8-rot-write,bfloat16-plain-fused > $OUT/qw.log 2>&1; echo "qw rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json, os
p = '/tmp/o42C/qw/qw_step.jsonl'
if os.path.exists(p):
  for l in open(p):
    r = json.loads(l); print(r['round'], r['model'], r['batch'], r['context'], r['variant'], round(r['step_ms'], 3), round(r['min_ms'], 3), round(r['max_ms'], 3))
PY
tar czf $O/o42C.tgz -C /tmp o42C
