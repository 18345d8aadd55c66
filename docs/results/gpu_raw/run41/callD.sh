# Run41 call D (tree 08d3763, 4920be2's kernels: the decode kernel rotates q, the new rows and its output
# itself): qw_check with rotated int8 (pools against write_kv_quantized of XLA's rotated
# rows); the old tree's (07947c5: rotation products around the kernel) int8 step in a
# process of its own; SmolLM2's int8 step kernels; then qw_step at HEAD.
set -u
O=$OUT; OUT=/tmp/o41D; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PAXCACHE_COMMIT=$(cat tmp/run41/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
left() { echo $(( 400 - ($(date +%s) - t0) )); }
PYTHONPATH=. timeout 100 python -m tmp.run41.qw_check $OUT/check > $OUT/check.log 2>&1; echo "check rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for l in open('/tmp/o41D/check/qw_check.jsonl'):
  r = json.loads(l); print(r['heads'], r['kv_dtype'], 'rot' if r['rotated'] else '', r['planned'], 'relL2', round(r['rel_l2_vs_reference'], 5), 'nan', r['nan'], 'unequal', r['k_unequal'], r['v_unequal'], r['k_scale_unequal'], r['v_scale_unequal'], 'maxdiff', r['k_max_abs_diff'], r['v_max_abs_diff'], r['k_scale_max_abs_diff'], r['v_scale_max_abs_diff'])
PY
PYTHONPATH=. timeout 80 python -m experiments.bench.profile_step --out $OUT/p_int8 --device --models smollm2-135m --gemm auto --shapes 64x512 --steps 10 --top 14 --kv-dtype int8 --commit $PAXCACHE_COMMIT > $OUT/p_int8.log 2>&1; echo "prof rc=$? $(( $(date +%s) - t0 ))s"; grep -E "kernels/step|  [0-9]" $OUT/p_int8.log | head -16
PYTHONPATH=. timeout $(left) python -m tmp.run41.qw_step $OUT/step $(( $(left) - 130 )) bfloat16-plain-fused,int8-rot-fused,int8-rot-write > $OUT/step.log 2>&1; echo "step rc=$? $(( $(date +%s) - t0 ))s"
[ $(left) -gt 60 ] && { QW_COMMIT=07947c5 PYTHONPATH=tmp/old0794:. timeout $(left) python -m tmp.run41.qw_step $OUT/old $(( $(left) - 35 )) int8-rot-fused > $OUT/old.log 2>&1; echo "old rc=$? $(( $(date +%s) - t0 ))s"; }
python - <<'PY'
import json
for f in ('old', 'step'):
  try:
    for l in open(f'/tmp/o41D/{f}/qw_step.jsonl'):
      r = json.loads(l); print(f, r['commit'], r['round'], r['model'], r['batch'], r['context'], r['variant'], round(r['step_ms'], 3), round(r['min_ms'], 3), round(r['max_ms'], 3))
  except FileNotFoundError:
    print(f, 'none')
PY
tar czf $O/o41D.tgz -C /tmp o41D
