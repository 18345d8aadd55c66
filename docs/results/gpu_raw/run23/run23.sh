set -u
ROOT=$(pwd)
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/ml_collections-1.1.0-py3-none-any.whl 2>&1 | tail -1
OLD=9e1df02
i=0
for tree in old new old new; do
  i=$((i+1))
  cd $ROOT; if [ $tree = old ]; then cd tmp/old; fi
  PYTHONPATH=. timeout 110 python -m experiments.bench.engine_step --out $OUT/es$i --models smollm2-135m --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 12 --repeats 11 --commit $([ $tree = old ] && echo $OLD || echo $PAXCACHE_COMMIT) > $OUT/es$i.log 2>&1
  echo "run $i $tree rc=$?"; grep -A6 "^model" $OUT/es$i.log
done
cd $OUT && true
cd $ROOT
XLA_FLAGS=--xla_gpu_enable_split_k_autotuning=false PYTHONPATH=. timeout 100 python -m experiments.bench.profile_step --out $OUT/px --device --steps 10 --top 14 --models llama-1b --shapes 64x512 --commit $PAXCACHE_COMMIT-nosplitk > $OUT/px.log 2>&1
echo "prof nosplitk rc=$?"; grep -A3 "kernels/step" $OUT/px.log; tail -3 $OUT/px.log
cd $OUT && tar czf r23.tgz es*/ px/ *.log && rm -rf es[0-9]/ px/
