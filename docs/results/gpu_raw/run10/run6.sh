set -u
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/ml_collections-1.1.0-py3-none-any.whl 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
git log --oneline -1 2>/dev/null || echo "commit $PAXCACHE_COMMIT"
timeout 240 python - <<'PY' > $OUT/step_memory.log 2>&1
import importlib.util, jax, traceback
spec = importlib.util.spec_from_file_location("tsm", "tests/paxcache/test_step_memory.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(jax.devices(), jax.__version__)
for name, args in [
  ("test_compiled_step_never_copies_a_lane_dense_pool", ("gpu",)),
  ("test_compiled_step_never_copies_a_lane_dense_pool", ("reference",)),
  ("test_compiled_step_never_copies_the_pool", ("gpu", 64)),
  ("test_compiled_step_with_a_decode_plan_never_copies_the_pool", ()),
]:
  try:
    getattr(m, name)(*args); print("PASS", name, args, flush=True)
  except Exception as e:
    print("FAIL", name, args, repr(e)[:800], flush=True)
PY
cat $OUT/step_memory.log | grep -v Warning
i=0
for ld in "" "--lane-dense" "" "--lane-dense"; do
  i=$((i+1))
  timeout 150 python -m experiments.bench.engine_step --out $OUT/es$i --models smollm2-135m,llama-1b --shapes 64x512 --big-pool-gb 1 --max-pool-gb 4 --repeats 11 $ld > $OUT/es$i.log 2>&1
  echo "run $i $ld rc=$?"; grep -A8 "^model" $OUT/es$i.log
done
cd $OUT && tar czf es.tgz es*/ es*.log step_memory.log && rm -rf es[0-9]/
