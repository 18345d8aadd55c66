# Run32 call E (H100): the engine step under XLA GEMM / command-buffer settings, one process
# each, alternating: default, cuBLAS (Triton GEMMs off), cuBLAS with every command-buffer
# type named, the default with every type named.
set -u
O=$OUT; OUT=/tmp/oE; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run32/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name --format=csv,noheader | tee $OUT/smi.txt
CB="--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"
declare -A F=( [a]="" [b]="--xla_gpu_enable_triton_gemm=false" [c]="--xla_gpu_enable_triton_gemm=false $CB" [d]="$CB" )
for r in a1 b1 c1 d1 a2 c2 b2 d2; do
  k=${r:0:1}; left=$(( 420 - ($(date +%s) - t0) )); [ $left -lt 50 ] && { echo "skip $r"; continue; }
  XLA_FLAGS="${F[$k]}" timeout $left python -m experiments.bench.engine_step --out /tmp/es_$r --repeats 11 --models llama-1b --big-pool-gb 10 --max-pool-gb 12 --commit $C > $OUT/step_$r.log 2>&1; echo "step $r rc=$? $(( $(date +%s) - t0 ))s [${F[$k]}]"
  grep -E "^(llama|smollm)" $OUT/step_$r.log
  sed "s/\"commit\"/\"xla_flags\": \"${F[$k]}\", \"commit\"/" /tmp/es_$r/engine_step.jsonl >> $OUT/engine_step.jsonl 2>/dev/null
done
cat $OUT/step_*.log > $OUT/all_steps.log
tar czf $O/allE.tgz -C /tmp oE; cp $OUT/all_steps.log $OUT/engine_step.jsonl $O/; ls -la $O
