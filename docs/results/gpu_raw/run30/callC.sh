# Run30 call C: the engine's cascade end to end on one system prompt (issue 16), the 64x512 step's
# kernels with XLA's Triton GEMMs off (issue 13 item 2), the engine's host work on this host.
set -u
O=$OUT; OUT=/tmp/oC; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(git rev-parse --short HEAD 2>/dev/null || cat tmp/run30/commit); CC=/tmp/jcc
t0=$(date +%s)
timeout 200 python -m experiments.bench.engine_step --out /tmp/es --no-step --e2e --async-scheduling --dispatch-thread --pipeline-depth 2 --models smollm2-135m --e2e-shared-prefix 2048 --e2e-cascade 0,default --e2e-repeats 3 --compilation-cache $CC --commit $C > $OUT/prefix_e2e.log 2>&1
echo "prefix e2e rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/prefix_e2e.log | cut -c1-400; cat /tmp/es/engine_e2e.jsonl > $OUT/engine_e2e_prefix.jsonl
for v in default notriton; do
  X=""; [ $v = notriton ] && X="--xla_gpu_enable_triton_gemm=false"
  XLA_FLAGS="$X" timeout 100 python -m experiments.bench.profile_step --out /tmp/p_$v --device --steps 10 --top 12 --shapes 64x512 --commit $C > $OUT/profile_$v.log 2>&1
  echo "profile $v rc=$? $(( $(date +%s) - t0 ))s"; grep -E "kernels|ms a step|^  " $OUT/profile_$v.log | head -30 | cut -c1-200
  cat /tmp/p_$v/*.jsonl > $OUT/profile_$v.jsonl 2>/dev/null
done
tar czf $O/allC.tgz -C /tmp oC; cp $OUT/*.log $O/ 2>/dev/null; ls -la $O
