# Run41 call B: the 8-bit fused write (07947c5) on the GPU: its pools against
# write_kv_quantized and its output against the reference (qw_check), then the engine's
# decode step with and without it beside a bf16 cache (qw_step).
set -u
O=$OUT; OUT=/tmp/o41B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run41/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
left() { echo $(( 575 - ($(date +%s) - t0) )); }
timeout 120 python -m tmp.run41.qw_check $OUT/check > $OUT/check.log 2>&1; echo "check rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for l in open('/tmp/o41B/check/qw_check.jsonl'):
  r = json.loads(l); print(r['heads'], r['kv_dtype'], r['planned'], 'relL2', round(r['rel_l2_vs_reference'], 5), 'nan', r['nan'], 'unequal k/v/ks/vs', r['k_unequal'], r['v_unequal'], r['k_scale_unequal'], r['v_scale_unequal'], 'maxdiff', r['k_max_abs_diff'], r['v_max_abs_diff'], r['k_scale_max_abs_diff'])
PY
timeout $(left) python -m tmp.run41.qw_step $OUT/step $(( $(left) - 40 )) > $OUT/step.log 2>&1; echo "step rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for l in open('/tmp/o41B/step/qw_step.jsonl'):
  r = json.loads(l); print(r['round'], r['model'], r['batch'], r['context'], r['kv_dtype'], r['kv_rotation'], 'fused' if r['fused_write'] else 'write', round(r['step_ms'], 3), round(r['min_ms'], 3), round(r['max_ms'], 3))
PY
tar czf $O/o41B.tgz -C /tmp o41B
