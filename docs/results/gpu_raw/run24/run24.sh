set -u
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/ml_collections-1.1.0-py3-none-any.whl 2>&1 | tail -1
i=0
for mode in exhaustive default exhaustive default; do
  i=$((i+1))
  if [ $mode = exhaustive ]; then export XLA_FLAGS=--xla_gpu_exhaustive_tiling_search=true; else unset XLA_FLAGS; fi
  t0=$(date +%s)
  timeout 200 python -m experiments.bench.engine_step --out $OUT/es$i --models llama-1b --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 2 --repeats 11 --commit $PAXCACHE_COMMIT-$mode > $OUT/es$i.log 2>&1
  echo "run $i $mode rc=$? $(( $(date +%s) - t0 )) s"; grep -A6 "^model" $OUT/es$i.log; tail -1 $OUT/es$i.log
done
unset XLA_FLAGS
cd $OUT && tar czf r24.tgz es*/ && rm -rf es[0-9]/
