# HLO of the engine's step after XLA's optimisations (both models, 64 x 512), with the profile
export PYTHONUNBUFFERED=1 PYTHONPATH=.
for m in llama-1b smollm2-135m; do
  rm -rf /tmp/dump_$m
  XLA_FLAGS="--xla_dump_to=/tmp/dump_$m --xla_dump_hlo_as_text" timeout 200 python -m experiments.bench.profile_step \
    --out /tmp/p_$m --device --models $m --shapes 64x512 --steps 5 --top 20 > $OUT/prof_$m.log 2>&1
  echo "$m rc=$?"; grep -A22 "kernels/step" $OUT/prof_$m.log | head -24
  f=$(ls -S /tmp/dump_$m/*after_optimizations.txt | head -1); echo "$f"; ls /tmp/dump_$m | wc -l
  cp "$f" /tmp/hlo_$m.txt
done
cd /tmp && tar czf $OUT/hlo.tgz hlo_llama-1b.txt hlo_smollm2-135m.txt && ls -la $OUT
