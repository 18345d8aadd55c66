# Run43 call A (H200; needs_h200 for issue 13's 100 GB pool): gpu_check of the 8-bit fused
# write on the H200; the engine's 8-bit step fused vs separate write (qw_step, 256x1024 first);
# issue 13's step table at HEAD (64x512 and 256x1024, live / 40x / 100 GB pools); a device
# profile of the 64x512 steps with the host's dispatch time; the fused-write kernel alone.
set -u
O=$OUT; OUT=/tmp/o43A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run43/commit)
C=$PAXCACHE_COMMIT
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/smi.txt
save() { tar czf $O/o43A.tgz -C /tmp o43A; }
el() { echo $(( $(date +%s) - t0 )); }
grep -q H200 $OUT/smi.txt || { echo "not an H200: nothing timed"; save; exit 0; }
timeout 80 python -m experiments.bench.gpu_check --only "packed int8" --out $OUT/check > $OUT/check_int8.log 2>&1; echo "check rc=$? $(el)s"; grep -E "FAIL|passed" $OUT/check_int8.log | tail -3; save
timeout 200 python -m experiments.bench.engine_step --out $OUT/es --repeats 11 --shapes 64x512,256x1024 --commit $C > $OUT/step.log 2>&1; echo "step rc=$? $(el)s"; grep -A14 "^model" $OUT/step.log; save
QW_BIG_FIRST=1 timeout 150 python tmp/run42/qw_step.py $OUT/qw 130 int8-rot-fused,int8-rot-write,bfloat16-plain-fused > $OUT/qw.log 2>&1; echo "qw rc=$? $(el)s"; save
python - <<'PY'
import json, os
p = '/tmp/o43A/qw/qw_step.jsonl'
if os.path.exists(p):
  for l in open(p):
    r = json.loads(l); print(r['round'], r['model'], r['batch'], r['context'], r['variant'], round(r['step_ms'], 3), round(r['min_ms'], 3), round(r['max_ms'], 3))
PY
[ $(el) -lt 470 ] && { XLA_FLAGS="--xla_dump_to=/tmp/xdump --xla_dump_hlo_as_text" timeout $(( 540 - $(el) )) python -m experiments.bench.profile_step --device --dispatch --shapes 64x512 --steps 10 --out $OUT/prof --commit $C > $OUT/prof.log 2>&1; echo "prof rc=$? $(el)s"; grep -v "^I1\|^W1" $OUT/prof.log | tail -60; mkdir -p $OUT/hlo; find /tmp/xdump -name "*after_optimizations.txt" -size +50k -exec cp {} $OUT/hlo/ \; ; ls -la $OUT/hlo | head; }
save
