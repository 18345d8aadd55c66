# Run46 call A (an H100 or the H200): the fused epilogues (residual adds in the o / down
# products, the MLP's RMSNorm in the SwiGLU front) checked against float64, then the
# step's kernels and times with fuse_epilogues on and off, 64 x 512, both models.
set -u
O=$OUT; OUT=/tmp/o46A; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run46/commit)
C=$PAXCACHE_COMMIT
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv | tee $OUT/smi.txt
save() { tar czf $O/o46A.tgz -C /tmp o46A; }
el() { echo $(( $(date +%s) - t0 )); }
timeout 150 python -m experiments.bench.gpu_check --only product --out $OUT/check > $OUT/check.log 2>&1; echo "check rc=$? $(el)s"; grep -E "PASS|FAIL|passed" $OUT/check.log | cut -c1-200; save
timeout 160 python -m experiments.bench.profile_step --device --shapes 64x512 --fuse-epilogues on,off --steps 10 --out $OUT/prof --commit $C > $OUT/prof.log 2>&1; echo "prof rc=$? $(el)s"; grep -A12 "kernels/step" $OUT/prof.log | cut -c1-150; save
timeout $(( 560 - $(el) )) python -m experiments.bench.engine_step --out $OUT/es --repeats 11 --shapes 64x512 --fuse-epilogues on,off,on --big-pool-gb 1 --max-pool-gb 9 --commit $C > $OUT/step.log 2>&1; echo "step rc=$? $(el)s"
python - <<'PY'
import json, glob
for l in open('/tmp/o46A/step.log'):
    if not l.startswith('[') or '{' not in l: continue
    r = json.loads(l[l.index('{'):])
    if 'paged_step_ms' in r:
      print(r['model'], r['batch'], r['context'], 'fuse', r['fuse_epilogues'], 'pool', r['pool_blocks'], 'paged %.3f (%.3f-%.3f)' % (r['paged_step_ms'], r.get('paged_step_ms_min', 0), r.get('paged_step_ms_max', 0)), 'roof %.3f' % r['roofline_ms'], 'x%.3f' % r['paged_over_roofline'], 'read', round(r['read_tbs'], 3))
PY
save
