set -u
export PYTHONPATH=.
python -m pip install --no-deps --force-reinstall tmp/whl/conch_triton_kernels-1.3-py3-none-any.whl 2>&1 | grep -v "root" | tail -3
python -c "import conch.third_party.vllm.unified_attention as m; print('conch ok')" 2>&1 | tail -2
for h in 9/3 32/8; do
  n=p$(echo $h | tr -d /)
  timeout 120 python -m experiments.bench.gpu_ragged --out $OUT/$n --cases engine61_b16 --heads $h --head-dim 64 --nomosaic > $OUT/$n.log 2>&1
  tail -3 $OUT/$n.log
done
cd $OUT && tar czf all.tgz p93 p328 *.log
