# Run42 call A: the 8-bit fused write at HEAD (q reloaded after the key loop) on the GPU:
# pools against write_kv_quantized (qw_check); kernel-level time of the int8 decode with
# the write inside (HEAD, and 1b018c5's kernel in tmp/old1b01) against the separate write
# (1B layer shape, 256 x 1024 and 64 x 512); registers / occupancy under ncu for each.
set -u
O=$OUT; OUT=/tmp/o42A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1
C=$(cat tmp/run42/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
for kv in int8 float8; do PYTHONPATH=. timeout 120 python -m experiments.bench.gpu_check --only "packed $kv" --out $OUT/check > $OUT/check_$kv.log 2>&1; echo "check $kv rc=$? $(( $(date +%s) - t0 ))s"; grep -E "PASS|FAIL|passed" $OUT/check_$kv.log; done
for round in 1 2; do
  PYTHONPATH=. timeout 100 python -m tmp.run42.fw_kernel $OUT/k 256x1024,64x512 write,fused,fused-2st 1 >> $OUT/k.log 2>&1; echo "new rc=$? $(( $(date +%s) - t0 ))s"
  FW_COMMIT=1b018c5 PYTHONPATH=tmp/old1b01:. timeout 100 python tmp/run42/fw_kernel.py $OUT/kold 256x1024,64x512 fused 1 >> $OUT/kold.log 2>&1; echo "old rc=$? $(( $(date +%s) - t0 ))s"
done
python - <<'PY'
import json
for f in ('k', 'kold'):
  for l in open(f'/tmp/o42A/{f}/fw_kernel.jsonl'):
    r = json.loads(l); print(f, r['commit'], r['batch'], r['context'], r['variant'], round(r['ms'], 4), round(r['min_ms'], 4), round(r['max_ms'], 4))
PY
NCU=$(which ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
M=launch__registers_per_thread,launch__occupancy_limit_registers,launch__occupancy_limit_shared_mem,launch__grid_size,launch__shared_mem_per_block_dynamic,gpu__time_duration.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,sm__warps_active.avg.pct_of_peak_sustained_active,launch__occupancy_per_block_size
for v in new:write new:fused old:fused; do
  tree=${v%%:*}; var=${v##*:}; pp=.; [ $tree = old ] && pp=tmp/old1b01:.
  [ $(( $(date +%s) - t0 )) -lt 520 ] && FW_NCU=1 PYTHONPATH=$pp timeout 60 $NCU --clock-control none --target-processes all --kernel-name regex:paxcache_paged_decode --launch-skip 2 --launch-count 1 --metrics $M python tmp/run42/fw_kernel.py /tmp/ncu_$tree$var 256x1024 $var 1 > $OUT/ncu_${tree}_${var}.txt 2>&1
  echo "ncu $v rc=$? $(( $(date +%s) - t0 ))s"; grep -E "registers|occupancy|duration|dram__|warps_active|grid_size|shared_mem" $OUT/ncu_${tree}_${var}.txt | head -12
done
tar czf $O/o42A.tgz -C /tmp o42A
