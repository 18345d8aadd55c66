set -u
pip install -q --no-deps tmp/whl/*.whl 2>&1 | grep -v WARNING | tail -1
T0=$(date +%s)
E2E="--no-step --e2e --async-scheduling --e2e-pool-gb 12 --models smollm2-135m --e2e-requests 192 --e2e-block-sizes 16"
(cd tmp/old && PYTHONPATH=. PAXCACHE_COMMIT=03d8a25 timeout 150 python -m experiments.bench.engine_step --out $OUT/cc_old $E2E --e2e-compile-only > $OUT/cc_old.log 2>&1) &
PYTHONPATH=. timeout 150 python -m experiments.bench.engine_step --out $OUT/cc_new $E2E --e2e-compile-only > $OUT/cc_new.log 2>&1 &
wait
echo "compile done $(( $(date +%s) - T0 )) s"
for i in 1 2; do
  (cd tmp/old && PYTHONPATH=. PAXCACHE_COMMIT=03d8a25 timeout 90 python -m experiments.bench.engine_step --out $OUT/e2e_old $E2E >> $OUT/e2e_old.log 2>&1)
  echo "old $i $(( $(date +%s) - T0 )) s"
  PYTHONPATH=. timeout 90 python -m experiments.bench.engine_step --out $OUT/e2e_new $E2E >> $OUT/e2e_new.log 2>&1
  echo "new $i $(( $(date +%s) - T0 )) s"
done
cd $OUT && tar czf all.tgz e2e_old e2e_new *.log && ls
