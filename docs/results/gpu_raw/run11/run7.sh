set -u
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/ml_collections-1.1.0-py3-none-any.whl 2>&1 | tail -1
timeout 240 python - <<'PY' > $OUT/step_memory.log 2>&1
import importlib.util, jax, re
spec = importlib.util.spec_from_file_location("tsm", "tests/paxcache/test_step_memory.py")
m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
print(jax.devices(), jax.__version__)
for name, args in [
  ("test_compiled_step_never_copies_a_lane_dense_pool", ("gpu",)),
  ("test_compiled_step_never_copies_the_pool", ("gpu", 64)),
  ("test_compiled_step_never_copies_the_pool", ("reference", 16)),
  ("test_compiled_step_with_a_decode_plan_never_copies_the_pool", ()),
  ("test_compiled_step_never_copies_an_8bit_pool_or_its_scales", ("gpu", 64)),
]:
  try:
    getattr(m, name)(*args); print("PASS", name, args, flush=True)
  except Exception as e:
    print("FAIL", name, args, repr(e)[:300], flush=True)
for ld in (False, True):
  small, _ = m._compiled_decode_step("reference", 64, m.SMALL_POOL, lane_dense=ld)
  large, cache = m._compiled_decode_step("reference", 64, m.LARGE_POOL, lane_dense=ld)
  a, b = small.memory_analysis(), large.memory_analysis()
  print("reference lane_dense", ld, "layer bytes", cache.k[0].nbytes, "temp", a.temp_size_in_bytes, b.temp_size_in_bytes,
        "alias", b.alias_size_in_bytes, "out", b.output_size_in_bytes,
        "copies", len(re.findall(r"copy\(", large.as_text())), flush=True)
PY
grep -v -i warn $OUT/step_memory.log
i=0
for tree in old new old new; do
  i=$((i+1))
  if [ $tree = old ]; then cd tmp/old; else cd .; fi
  PYTHONPATH=. timeout 170 python -m experiments.bench.engine_step --out $OUT/es$i --models smollm2-135m,llama-1b --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 12 --repeats 11 --commit $([ $tree = old ] && echo 0c8b9fe || echo $PAXCACHE_COMMIT) > $OUT/es$i.log 2>&1
  echo "run $i $tree rc=$?"; grep -A10 "^model" $OUT/es$i.log
  cd - > /dev/null
done
cd $OUT && tar czf es.tgz es*/ es*.log step_memory.log && rm -rf es[0-9]/
