set -u
export PYTHONPATH=.
timeout 400 python tmp/sweep_heads.py 2>&1 | grep -v -i warn | tee $OUT/sweep_heads.log | tail -40
