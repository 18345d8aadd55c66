export PYTHONUNBUFFERED=1 PYTHONPATH=.
timeout 300 python tmp/run28/vt_time.py 2>&1 | grep -v "^W1204\|^I1204"
timeout 120 ncu --clock-control none --target-processes all -k regex:scratch_vt --launch-skip 0 --launch-count 1 --set full \
  -o /tmp/ncu_vt python tmp/run28/vt_time.py vt_qkv_b3_bm_t128_w4_s3 > /tmp/ncu_vt.log 2>&1; echo "ncu rc=$?"; tail -5 /tmp/ncu_vt.log
ncu -i /tmp/ncu_vt.ncu-rep --page details > $OUT/vt_details.txt 2>&1
ncu -i /tmp/ncu_vt.ncu-rep --page source --csv --print-source sass > $OUT/vt_sass.csv 2>&1
grep -E "Duration|DRAM Throughput|Registers Per|Waves Per|Theoretical Occ|Issue Slots" $OUT/vt_details.txt
