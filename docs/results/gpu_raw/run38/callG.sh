# Run38 call G: Nsight Compute on the split-K decode at the engine's 64 x 512 shapes
# (head_dim 64): the 1B heads (32/8) and SmolLM2's (9/3).
set -u
O=$OUT; OUT=/tmp/o38G; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run38/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
which ncu || ls /usr/local/cuda*/bin/ncu
t0=$(date +%s)
timeout 260 python -m experiments.bench.ncu_profile --shape 64x512 --heads 32/8 --head-dim 64 --out $OUT/d32 > $OUT/d32.log 2>&1; echo "d32 rc=$? $(( $(date +%s) - t0 ))s"
timeout 260 python -m experiments.bench.ncu_profile --shape 64x512 --heads 9/3 --head-dim 64 --out $OUT/d9 > $OUT/d9.log 2>&1; echo "d9 rc=$? $(( $(date +%s) - t0 ))s"
tail -40 $OUT/d32.log; tail -40 $OUT/d9.log
tar czf $O/o38G.tgz -C /tmp o38G
