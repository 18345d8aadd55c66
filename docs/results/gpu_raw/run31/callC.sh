# Run31 call C: decode bursts' tokens on the GPU backend (tiny model), then the ShareGPT-like
# runs of the Llama-3.2-1B shape (128 requests) with and without bursts, and SmolLM2's at block 64.
set -u
O=$OUT; OUT=/tmp/oC; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
C=$(cat tmp/run31/commit); CC=/tmp/jcc
t0=$(date +%s); nvidia-smi --query-gpu=name --format=csv | tee $OUT/smi.txt
timeout 120 python tmp/run31/burst_parity.py > $OUT/parity.log 2>&1; echo "parity rc=$? $(( $(date +%s) - t0 ))s"; grep -E "parity|differs|backend|Error" $OUT/parity.log | cut -c1-300
BASE="--dispatch-thread --pipeline-depth 2"; B4="--dispatch-thread --decode-steps 4"
S="python -m experiments.bench.engine_step --no-step --e2e --async-scheduling --compilation-cache $CC --e2e-repeats 3"
j=0
for run in "llama-1b|128|16|$BASE" "llama-1b|128|16|$B4" "smollm2-135m|192|64|$B4"; do
  j=$((j+1)); IFS='|' read m n b cfg <<< "$run"; left=$(( 540 - ($(date +%s) - t0) )); [ $left -lt 60 ] && { echo "skip $run"; continue; }
  timeout $left $S --models $m --e2e-requests $n --e2e-block-sizes $b --e2e-pool-gb 12 $cfg --commit $C --out /tmp/sc$j > $OUT/share_$j.log 2>&1
  echo "sharegpt $m bs=$b '$cfg' rc=$? $(( $(date +%s) - t0 ))s"; grep -E "^e2e" $OUT/share_$j.log | cut -c1-420
  cat /tmp/sc$j/engine_e2e.jsonl >> $OUT/engine_e2e.jsonl 2>/dev/null
done
tar czf $O/allC.tgz -C /tmp oC; cp $OUT/*.log $O/ 2>/dev/null; ls -la $O
