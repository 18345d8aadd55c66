export PYTHONUNBUFFERED=1 PYTHONPATH=.
for m in planned default; do
  timeout 120 ncu --clock-control none --target-processes all -k regex:paxcache --launch-skip 2 --launch-count 1 --set full \
    -o /tmp/ncu_$m python tmp/run28/ncu_small.py $m > /tmp/ncu_$m.log 2>&1; echo "$m rc=$?"; tail -2 /tmp/ncu_$m.log
  ncu -i /tmp/ncu_$m.ncu-rep --page details > $OUT/small_${m}_details.txt 2>&1
  ncu -i /tmp/ncu_$m.ncu-rep --page source --csv --print-source sass > $OUT/small_${m}_sass.csv 2>&1
  grep -E "Duration|DRAM Throughput|Registers Per|Waves Per|Theoretical Occ|Achieved Occ|Issue Slots|Grid Size|Dynamic Shared|Block Limit" $OUT/small_${m}_details.txt
done
