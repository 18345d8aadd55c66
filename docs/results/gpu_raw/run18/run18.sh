set -u
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/conch_triton_kernels-1.3-py3-none-any.whl 2>&1 | tail -1
timeout 540 python tmp/sweep64.py 2>&1 | grep -v "^I1203\|^W1203" | tee $OUT/sweep64.log
