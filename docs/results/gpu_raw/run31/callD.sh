# Run31 call D: SmolLM2 ShareGPT-like at block 64 without bursts, and with bursts at blocks 32 and 128.
# runs of the Llama-3.2-1B shape (128 requests) with and without bursts, and SmolLM2's at block 64.
set -u
O=$OUT; OUT=/tmp/oD; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run31/commit); CC=/tmp/jcc
t0=$(date +%s); nvidia-smi --query-gpu=name --format=csv | tee $OUT/smi.txt
BASE="--dispatch-thread --pipeline-depth 2"; B4="--dispatch-thread --decode-steps 4"
S="python -m experiments.bench.engine_step --no-step --e2e --async-scheduling --compilation-cache $CC --e2e-repeats 3"
j=0
for run in "smollm2-135m|192|64|$BASE" "smollm2-135m|192|32|$B4" "smollm2-135m|192|128|$B4"; do
  j=$((j+1)); IFS='|' read m n b cfg <<< "$run"; left=$(( 400 - ($(date +%s) - t0) )); [ $left -lt 60 ] && { echo "skip $run"; continue; }
  timeout $left $S --models $m --e2e-requests $n --e2e-block-sizes $b --e2e-pool-gb 12 $cfg --commit $C --out /tmp/sd$j > $OUT/share_$j.log 2>&1
  echo "sharegpt $m bs=$b '$cfg' rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/share_$j.log | cut -c1-420
  cat /tmp/sd$j/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl 2>/dev/null
done
tar czf $O/allD.tgz -C /tmp oD; cp $OUT/*.log $O/ 2>/dev/null; ls -la $O
