# Run43 call B (H200, the session's last device time): call A cut down. The 8-bit fused
# write's pool check; the engine's 8-bit step fused vs separate at 256 x 1024 (then 64 x 512
# as time allows); issue 13's 64 x 512 table at HEAD with the 100 GB pool.
set -u
O=$OUT; OUT=/tmp/o43B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run43/commit)
C=$PAXCACHE_COMMIT
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
save() { tar czf $O/o43B.tgz -C /tmp o43B; }
el() { echo $(( $(date +%s) - t0 )); }
grep -q H200 $OUT/smi.txt || { echo "not an H200: nothing timed"; save; exit 0; }
timeout 80 python -m experiments.bench.gpu_check --only "packed int8" --out $OUT/check > $OUT/check_int8.log 2>&1; echo "check rc=$? $(el)s"; grep -E "FAIL|passed" $OUT/check_int8.log | tail -3; save
QW_BIG_FIRST=1 timeout 150 python tmp/run42/qw_step.py $OUT/qw 120 int8-rot-fused,int8-rot-write,bfloat16-plain-fused > $OUT/qw.log 2>&1; echo "qw rc=$? $(el)s"; save
python - <<'PY'
import json, os
p = '/tmp/o43B/qw/qw_step.jsonl'
if os.path.exists(p):
  for l in open(p):
    r = json.loads(l); print(r['round'], r['model'], r['batch'], r['context'], r['variant'], round(r['step_ms'], 3), round(r['min_ms'], 3), round(r['max_ms'], 3))
PY
[ $(el) -lt 300 ] && { timeout $(( 400 - $(el) )) python -m experiments.bench.engine_step --out $OUT/es --repeats 11 --shapes 64x512 --commit $C > $OUT/step.log 2>&1; echo "step rc=$? $(el)s"; grep -A8 "^model" $OUT/step.log; }
save
