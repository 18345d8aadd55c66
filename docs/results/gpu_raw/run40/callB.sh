# Run40 call B: XLA fusion options against the decode step's small kernels (norms, residual
# adds, RoPE/pack): kernels a step and kernel ms a step at 64x512, both models, one process
# per option set; then the paged step with the option sets that ran.
set -u
O=$OUT; OUT=/tmp/o40B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run40/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
left() { echo $(( 575 - ($(date +%s) - t0) )); }
declare -A V
V[base]=""
V[heroless]="--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true"
V[tmof]="--xla_gpu_unsupported_enable_triton_multi_output_fusion=true"
V[ssmof]="--xla_gpu_experimental_enable_same_shape_multi_output_fusion=true"
V[all3]="--xla_gpu_experimental_enable_triton_heroless_priority_fusion=true --xla_gpu_unsupported_enable_triton_multi_output_fusion=true --xla_gpu_experimental_enable_same_shape_multi_output_fusion=true"
V[alltriton]="--xla_gpu_experimental_all_fusions_with_triton=true"
for v in base heroless tmof ssmof all3 alltriton; do
  [ $(left) -gt 200 ] || break
  XLA_FLAGS="${V[$v]}" timeout 90 python -m experiments.bench.profile_step --out $OUT/p_$v --device --gemm auto --shapes 64x512 --steps 10 --top 14 --commit $PAXCACHE_COMMIT > $OUT/p_$v.log 2>&1; echo "$v rc=$? $(( $(date +%s) - t0 ))s"; grep -E "kernels/step" $OUT/p_$v.log
done
for v in all3 base; do
  [ $(left) -gt 100 ] || break
  XLA_FLAGS="${V[$v]}" timeout $(( $(left) - 20 )) python -m experiments.bench.engine_step --out $OUT/es_$v --gemm auto --shapes 64x512 --big-pool-gb 1 --max-pool-gb 9 --repeats 11 --compilation-cache '' > $OUT/es_$v.log 2>&1; echo "es $v rc=$? $(( $(date +%s) - t0 ))s"; tail -6 $OUT/es_$v.log
done
tar czf $O/o40B.tgz -C /tmp o40B
