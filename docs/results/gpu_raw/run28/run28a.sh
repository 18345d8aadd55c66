set -u
export PYTHONUNBUFFERED=1 PYTHONPATH=.
which ncu || ls /opt/nvidia/nsight-compute/*/ncu
NCU=$(which ncu 2>/dev/null || ls /opt/nvidia/nsight-compute/*/ncu | head -1)
for m in int8 bf16 e4m3; do
  t0=$(date +%s)
  timeout 150 $NCU --clock-control none --target-processes all -k regex:paged_decode \
    --launch-skip 2 --launch-count 1 --set full -o /tmp/ncu_$m python tmp/run28/ncu_case.py $m > /tmp/ncu_$m.log 2>&1
  echo "ncu $m rc=$? $(( $(date +%s) - t0 ))s"; tail -3 /tmp/ncu_$m.log
  $NCU -i /tmp/ncu_$m.ncu-rep --page details > $OUT/${m}_details.txt 2>&1
  [ $m = int8 ] && $NCU -i /tmp/ncu_$m.ncu-rep --page source --csv --print-source sass > $OUT/${m}_sass.csv 2>&1
  [ $m = bf16 ] && $NCU -i /tmp/ncu_$m.ncu-rep --page source --csv --print-source sass > $OUT/${m}_sass.csv 2>&1
done
ls -la $OUT
