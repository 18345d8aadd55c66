export PYTHONUNBUFFERED=1 PYTHONPATH=.
for m in llama-1b smollm2-135m; do
  n=$([ $m = llama-1b ] && echo 48 || echo 90)
  XLA_FLAGS=--xla_gpu_enable_command_buffer= timeout 150 ncu --clock-control none --target-processes all -k regex:paged_decode --launch-skip $n --launch-count 1 \
    --set full -o /tmp/ncu_$m python tmp/run28/ncu_step.py $m > /tmp/ncu_$m.log 2>&1; echo "$m rc=$?"; tail -2 /tmp/ncu_$m.log
  ncu -i /tmp/ncu_$m.ncu-rep --page details > $OUT/${m}_decode_details.txt 2>&1
  ncu -i /tmp/ncu_$m.ncu-rep --page source --csv --print-source sass > $OUT/${m}_decode_sass.csv 2>&1
  grep -E "Duration|DRAM Throughput|Registers Per|Waves Per|Theoretical Occ|Achieved Occ|Issue Slots|Grid Size|Dynamic Shared" $OUT/${m}_decode_details.txt
done
