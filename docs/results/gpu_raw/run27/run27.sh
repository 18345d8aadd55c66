# run27: the decode kernel writes the step's K/V (kernels.write_and_decode), against the
# tree before it (a90a049, unpacked in tmp/old).
#   bash docs/results/gpu_raw/run27/run27.sh 1   # 7d6f019 (q, k and v apart): the check on the
#                                                # card, then engine_step new, old (with e2e)
#   bash docs/results/gpu_raw/run27/run27.sh 2   # the packed q/k/v: its check, a kernel
#                                                # profile, then engine_step new, old (no e2e)
# Phase 1 ran at 7d6f019; its kernel profiles (p_new, p_old) in a call of their own:
#   profile_step --device --steps 10 --top 16 --shapes 64x512, new then old.
set -u
PHASE=$1
ROOT=$(pwd)
export PYTHONUNBUFFERED=1
NEW=$(cat tmp/new_commit)
es() {  # es TREE N [extra flags]: the engine step table (and e2e runs) of both models
  cd $ROOT; [ $1 = old ] && cd tmp/old
  PYTHONPATH=. timeout 240 python -m experiments.bench.engine_step --out $OUT/es$2 \
    --models smollm2-135m,llama-1b --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 12 \
    --repeats 11 $3 --commit $([ $1 = old ] && echo a90a049 || echo $NEW) > $OUT/es$2.log 2>&1
  echo "es$2 $1 rc=$?"; grep -E "^(smollm2|llama|e2e)" $OUT/es$2.log | cut -c1-200
}
prof() {  # prof TREE N: kernels per step at 64 x 512
  cd $ROOT; [ $1 = old ] && cd tmp/old
  PYTHONPATH=. timeout 100 python -m experiments.bench.profile_step --out $OUT/p$2 --device \
    --steps 10 --top 16 --shapes 64x512 > $OUT/p$2.log 2>&1
  echo "p$2 $1 rc=$?"; grep -A17 "kernels/step" $OUT/p$2.log
}
if [ $PHASE = 1 ]; then
  PYTHONPATH=. timeout 120 python -m experiments.bench.gpu_check --only write+decode \
    --out $OUT/check > $OUT/check.log 2>&1
  echo "check rc=$?"; grep -E "PASS|FAIL|passed" $OUT/check.log | cut -c1-200
  E2E="--e2e --e2e-requests 192,128 --async-scheduling --e2e-pool-gb 12"
  es new 1 "$E2E"; es old 2 "$E2E"
else
  PYTHONPATH=. timeout 90 python -m experiments.bench.gpu_check --only "write+decode packed" \
    --out $OUT/check2 > $OUT/check2.log 2>&1
  echo "check rc=$?"; grep -E "PASS|FAIL|passed" $OUT/check2.log | cut -c1-200
  prof new 7; es new 3 ""; es old 4 ""
fi
