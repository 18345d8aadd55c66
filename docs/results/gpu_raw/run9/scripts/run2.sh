set -u
export PYTHONPATH=.
pip install -q --no-deps tmp/whl/*.whl 2>&1 | grep -v WARNING | tail -1
T0=$(date +%s)
for h in 9/3 32/8; do
  n=k$(echo $h | tr -d /)
  timeout 60 python -m experiments.bench.gpu_ragged --out $OUT/$n --cases engine61_b16 --heads $h --head-dim 64 --nomosaic --no-peer > $OUT/$n.log 2>&1
done
echo "kernels done $(( $(date +%s) - T0 )) s"
E2E="--no-step --e2e --async-scheduling --e2e-pool-gb 12"
for m in smollm2-135m:192 llama-1b:128; do for bs in 16 32 64 128; do
  timeout 180 python -m experiments.bench.engine_step --out $OUT/cc $E2E --models ${m%:*} --e2e-requests ${m#*:} --e2e-block-sizes $bs --e2e-compile-only > $OUT/cc_${m%:*}_${bs}.log 2>&1 &
done; done
wait
echo "compile done $(( $(date +%s) - T0 )) s"
timeout $(( 575 - ($(date +%s) - T0) )) python -m experiments.bench.engine_step --out $OUT/e2e $E2E --models smollm2-135m --e2e-requests 192 --e2e-block-sizes 16,32,64,128 --e2e-steps-out > $OUT/e2e_smollm2.log 2>&1
echo "smollm2 done $(( $(date +%s) - T0 )) s"
timeout $(( 590 - ($(date +%s) - T0) )) python -m experiments.bench.engine_step --out $OUT/e2e $E2E --models llama-1b --e2e-requests 128 --e2e-block-sizes 16,128,32,64 > $OUT/e2e_1b.log 2>&1
echo "1b done $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf all.tgz k93 k328 e2e *.log && ls
