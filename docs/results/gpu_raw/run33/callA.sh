# Run33 call A: the decode step under XLA options per jit (tmp/run33/opts.py), 64 x 512.
# Options that change the Triton GEMM search run in processes of their own (XLA's in-process
# autotuning cache may not key on them), each beside cuBLAS as a same-process anchor.
set -u
O=$OUT; OUT=/tmp/oA; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. OUT_DIR=$OUT
t0=$(date +%s); nvidia-smi --query-gpu=name,clocks.max.sm,memory.total --format=csv | tee $OUT/smi.txt
run() {  # model variants tag
  left=$(( 570 - ($(date +%s) - t0) )); [ $left -lt 45 ] && { echo "skip $1 $2"; return; }
  timeout $left python tmp/run33/opts.py $1 64x512 $2 11 > $OUT/$1_$3.log 2>&1
  echo "$1 $3 rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^$1|failed" $OUT/$1_$3.log | cut -c1-160
}
run smollm2-135m default,cublas,heroless,allfus,blocklevel,gemmv2 base
run smollm2-135m exh,cublas exh
run llama-1b default,cublas,heroless,allfus,blocklevel,gemmv2 base
run smollm2-135m fusauto,cublas fusauto
run smollm2-135m postfus,cublas postfus
run smollm2-135m split1,cublas split1
run llama-1b exh,cublas exh
tar czf $O/allA.tgz -C /tmp oA; cat $OUT/*.log > $O/all.log; cp $OUT/opts.jsonl $O/ 2>/dev/null; ls -la $O
