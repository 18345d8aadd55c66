# Run40 call D (the rotation as one product, 3f49288 onwards): the int8 cache's rotation (DecoderConfig.kv_rotation) in the engine's step:
# int8 rotated / int8 plain / bf16 at 64x512 and 256x1024, both models; on an H200 first
# issue 13 item 2's step table at HEAD.
set -u
O=$OUT; OUT=/tmp/o40D; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run40/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
left() { echo $(( 575 - ($(date +%s) - t0) )); }
if grep -q H200 $OUT/smi.txt; then
  timeout 150 python -m experiments.bench.engine_step --out $OUT/es --gemm auto --shapes 64x512,256x1024 --big-pool-gb 1 --max-pool-gb 9 --repeats 11 --compilation-cache '' > $OUT/es.log 2>&1; echo "es rc=$? $(( $(date +%s) - t0 ))s"; tail -10 $OUT/es.log
  timeout 100 python -m experiments.bench.profile_step --out $OUT/p --device --gemm auto --shapes 64x512 --steps 10 --top 12 --commit $PAXCACHE_COMMIT > $OUT/p.log 2>&1; echo "p rc=$? $(( $(date +%s) - t0 ))s"; grep -E "kernels/step" $OUT/p.log
fi
timeout $(left) python -m tmp.run40.rot_step $OUT/rot > $OUT/rot.log 2>&1; echo "rot rc=$? $(( $(date +%s) - t0 ))s"
python - <<'PY'
import json
for l in open('/tmp/o40D/rot/rot_step.jsonl'):
  r = json.loads(l); print(r['round'], r['model'], r['batch'], r['context'], r['kv_dtype'], r['kv_rotation'], round(r['step_ms'], 3), round(r['min_ms'], 3), round(r['max_ms'], 3))
PY
tar czf $O/o40D.tgz -C /tmp o40D
