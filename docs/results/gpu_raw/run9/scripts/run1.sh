set -u
export PYTHONPATH=.
pip install -q --no-deps tmp/whl/*.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
T0=$(date +%s)
MC=0,128,256,384,512,768,1024
timeout 150 python -m experiments.bench.gpu_ragged --out $OUT/k93 --cases engine61_b16 --heads 9/3 --head-dim 64 --sweep --sweep-min-chunks $MC --nomosaic --no-peer > $OUT/k93.log 2>&1
echo "k93 done $(( $(date +%s) - T0 )) s"
timeout 130 python -m experiments.bench.gpu_ragged --out $OUT/k328 --cases engine61_b16 --heads 32/8 --head-dim 64 --sweep --sweep-min-chunks $MC --nomosaic --no-peer > $OUT/k328.log 2>&1
echo "k328 done $(( $(date +%s) - T0 )) s"
E2E="--no-step --e2e --async-scheduling --models smollm2-135m --e2e-requests 192 --e2e-pool-gb 12"
for bs in 16 128; do for mc in 0 1024; do
  timeout 150 python -m experiments.bench.engine_step --out $OUT/cc $E2E --e2e-block-sizes $bs --e2e-min-chunks $mc --e2e-compile-only > $OUT/cc_${bs}_${mc}.log 2>&1 &
done; done
wait
echo "compile done $(( $(date +%s) - T0 )) s"
timeout $(( 570 - ($(date +%s) - T0) )) python -m experiments.bench.engine_step --out $OUT/e2e $E2E --e2e-block-sizes 16,128 --e2e-min-chunks 0,1024 --e2e-repeats 3 --e2e-steps-out > $OUT/e2e.log 2>&1
echo "e2e done $(( $(date +%s) - T0 )) s"
cd $OUT && tar czf all.tgz k93 k328 e2e *.log && ls
