# Run40 call A (H200 wanted): issue 13 item 2 at HEAD (both models, 64x512 and 256x1024),
# the step's kernels at 64x512 with XLA's PDL on (default) and off, SwiGLU's three fronts.
set -u
O=$OUT; OUT=/tmp/o40A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run40/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
left() { echo $(( 570 - ($(date +%s) - t0) )); }
timeout $(left) python -m experiments.bench.engine_step --out $OUT/es --gemm auto --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 9 --repeats 11 --compilation-cache '' > $OUT/es.log 2>&1; echo "es rc=$? $(( $(date +%s) - t0 ))s"; tail -12 $OUT/es.log
timeout $(left) python -m experiments.bench.profile_step --out $OUT/p_on --device --gemm auto --shapes 64x512 --steps 10 --top 20 --commit $PAXCACHE_COMMIT > $OUT/p_on.log 2>&1; echo "p_on rc=$? $(( $(date +%s) - t0 ))s"; grep -E "kernels/step|kernel ms" $OUT/p_on.log | head
[ $(left) -gt 150 ] && { XLA_FLAGS=--xla_gpu_enable_pdl=false timeout $(left) python -m experiments.bench.profile_step --out $OUT/p_nopdl --device --gemm auto --shapes 64x512 --steps 10 --top 20 --commit $PAXCACHE_COMMIT > $OUT/p_nopdl.log 2>&1; echo "p_nopdl rc=$? $(( $(date +%s) - t0 ))s"; grep -E "kernels/step|kernel ms" $OUT/p_nopdl.log | head; }
[ $(left) -gt 60 ] && { timeout $(left) python -m experiments.bench.gemm_rows --swiglu --rows 32,64,128 --layers 30 --commit $PAXCACHE_COMMIT --out $OUT/sw > $OUT/sw.log 2>&1; echo "sw rc=$? $(( $(date +%s) - t0 ))s"; tail -14 $OUT/sw.log; }
tar czf $O/o40A.tgz -C /tmp o40A
