set -u
export PYTHONPATH=.
timeout 500 python -m experiments.bench.gpu_ragged --out $OUT/r --cases full8x4096_b16,long1_short63_b16,uniform64_b16 --sweep --sweep-min-chunks 0,1536,2048,4096 --nomosaic --no-peer --budget-s 400 2>&1 | grep -v "^I1203\|^W1203" | tee $OUT/ragged.log | tail -60
ls $OUT/r
