set -u
ROOT=$(pwd)
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/ml_collections-1.1.0-py3-none-any.whl 2>&1 | tail -1
OLD=9e1df02
i=0
for tree in new old; do
  i=$((i+1))
  cd $ROOT; if [ $tree = old ]; then cd tmp/old; fi
  PYTHONPATH=. timeout 100 python -m experiments.bench.profile_step --out $OUT/p$i --device --steps 10 --top 14 --models llama-1b --shapes 64x512,256x1024 --commit $([ $tree = old ] && echo $OLD || echo $PAXCACHE_COMMIT) > $OUT/p$i.log 2>&1
  echo "prof $i $tree rc=$?"; grep -A3 "kernels/step" $OUT/p$i.log
done
for tree in old new old new; do
  i=$((i+1))
  cd $ROOT; if [ $tree = old ]; then cd tmp/old; fi
  PYTHONPATH=. timeout 110 python -m experiments.bench.engine_step --out $OUT/es$i --models llama-1b --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 12 --repeats 11 --commit $([ $tree = old ] && echo $OLD || echo $PAXCACHE_COMMIT) > $OUT/es$i.log 2>&1
  echo "run $i $tree rc=$?"; grep -A6 "^model" $OUT/es$i.log
done
cd $OUT && tar czf r22.tgz p*/ es*/ *.log && rm -rf p[0-9]/ es[0-9]/
