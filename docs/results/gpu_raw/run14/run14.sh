set -u
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/ml_collections-1.1.0-py3-none-any.whl 2>&1 | tail -1
run() {  # name, xla flags
  t0=$(date +%s)
  XLA_FLAGS="$2" timeout 200 python -m experiments.bench.profile_step --out $OUT/$1 --device --steps 10 --top 70 --models llama-1b --shapes 64x512 > $OUT/$1.log 2>&1
  echo "$1 rc=$? $(( $(date +%s) - t0 )) s"; grep -A12 "kernels/step" $OUT/$1.log
}
run base "--xla_dump_to=$OUT/dump --xla_dump_hlo_as_text"
run nocublas_off "--xla_gpu_enable_triton_gemm=false"
run cublaslt "--xla_gpu_enable_triton_gemm=false --xla_gpu_enable_cublaslt=true"
cd $OUT && ls dump | wc -l && du -sh dump && ls -S dump/*after_optimizations.txt | head -4 > big.txt && cat big.txt && tar czf dump.tgz $(cat big.txt) && rm -rf dump && ls -la
