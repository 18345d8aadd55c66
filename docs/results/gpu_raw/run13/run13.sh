set -u
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/ml_collections-1.1.0-py3-none-any.whl 2>&1 | tail -1
for flags in "" "--xla_gpu_exhaustive_tiling_search=true"; do
  i=$([ -z "$flags" ] && echo base || echo exh)
  t0=$(date +%s)
  XLA_FLAGS="$flags" timeout 150 python -m experiments.bench.profile_step --out $OUT/$i --device --steps 10 --top 8 --models llama-1b --shapes 64x512 > $OUT/$i.log 2>&1
  echo "$i rc=$? $(( $(date +%s) - t0 )) s"; grep -A8 "kernels/step" $OUT/$i.log
done
