# Run42 call B (H200): the 8-bit fused write's pool check at HEAD (gpu_check, int8); the
# engine's 8-bit step with the write in the kernel (HEAD: no rotation inside) and without
# (qw_step), bf16 beside them; the kernel-level comparison (fw_kernel) and ncu; then issue
# 13's step table as time allows.
set -u
O=$OUT; OUT=/tmp/o42B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run42/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
grep -q H200 $OUT/smi.txt || { echo "not an H200: nothing timed"; tar czf $O/o42B.tgz -C /tmp o42B; exit 0; }
left() { echo $(( 300 - ($(date +%s) - t0) )); }
save() { tar czf $O/o42B.tgz -C /tmp o42B; }
timeout 70 python -m experiments.bench.gpu_check --only "packed int8" --out $OUT/check > $OUT/check_int8.log 2>&1; echo "check rc=$? $(( $(date +%s) - t0 ))s"; grep -E "FAIL|passed" $OUT/check_int8.log; save
QW_BIG_FIRST=1 timeout 200 python -m tmp.run42.qw_step $OUT/qw 165 int8-rot-fused,int8-rot-write,bfloat16-plain-fused > $OUT/qw.log 2>&1; echo "qw rc=$? $(( $(date +%s) - t0 ))s"; save
python - <<'PY'
import json, os
p = '/tmp/o42B/qw/qw_step.jsonl'
if os.path.exists(p):
  for l in open(p):
    r = json.loads(l); print(r['round'], r['model'], r['batch'], r['context'], r['variant'], round(r['step_ms'], 3), round(r['min_ms'], 3), round(r['max_ms'], 3))
PY
[ $(left) -gt 80 ] && { timeout 70 python -m tmp.run42.fw_kernel $OUT/k 256x1024,64x512 write,fused 2 > $OUT/k.log 2>&1; echo "fw rc=$? $(( $(date +%s) - t0 ))s"; }
python - <<'PY'
import json, os
p = '/tmp/o42B/k/fw_kernel.jsonl'
if os.path.exists(p):
  for l in open(p):
    r = json.loads(l); print('k', r['round'], r['batch'], r['context'], r['variant'], round(r['ms'], 4), round(r['min_ms'], 4), round(r['max_ms'], 4))
PY
NCU=$(which ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
M=launch__registers_per_thread,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,lts__t_sector_hit_rate.pct,dram__bytes_read.sum,dram__bytes_write.sum
for var in write fused; do
  [ $(left) -gt 60 ] && { FW_NCU=1 timeout 45 $NCU --clock-control none --target-processes all --kernel-name regex:paxcache_paged_decode --launch-skip 2 --launch-count 1 --metrics $M python -m tmp.run42.fw_kernel /tmp/ncu_$var 256x1024 $var 1 > $OUT/ncu_$var.txt 2>&1; echo "ncu $var rc=$? $(( $(date +%s) - t0 ))s"; grep -E "registers|duration|dram__|warps_active|hit_rate" $OUT/ncu_$var.txt | head -8; }
done
[ $(left) -gt 120 ] && { timeout $(( $(left) - 10 )) python -m experiments.bench.engine_step --out $OUT/es --repeats 11 --shapes 64x512 --commit $C > $OUT/step.log 2>&1; echo "step rc=$? $(( $(date +%s) - t0 ))s"; grep -A8 "^model" $OUT/step.log; }
tar czf $O/o42B.tgz -C /tmp o42B
