set -u
export PYTHONPATH=.
python -m pip install -q --no-deps --force-reinstall tmp/whl/conch_triton_kernels-1.3-py3-none-any.whl 2>&1 | grep -v "root" | tail -1
for h in 9/3; do
  n=p$(echo $h | tr -d /)
  timeout 120 python -m experiments.bench.gpu_ragged --out $OUT/$n --cases engine61_b16 --heads $h --head-dim 64 --nomosaic > $OUT/$n.log 2>&1
  tail -3 $OUT/$n.log
done
