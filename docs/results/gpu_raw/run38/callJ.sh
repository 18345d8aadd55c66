# Run38 call J: the engine step's kernels (profile_step --device, 64x512, both models)
# with the own-row preload by the rule (d18e055) and turned off, alternating, 2 each.
set -u
O=$OUT; OUT=/tmp/o38J; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run38/commit)
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
t0=$(date +%s)
A="-m experiments.bench.profile_step"
B="tmp/run38/noprefetch.py experiments.bench.profile_step"
for i in 1 2; do
  for v in on off; do
    if [ $v = on ]; then cmd=$A; else cmd=$B; fi
    timeout 140 python $cmd --out $OUT/p_${v}_$i --device --gemm auto --shapes 64x512 --steps 10 --top 6 > $OUT/p_${v}_$i.log 2>&1; echo "$v $i rc=$? $(( $(date +%s) - t0 ))s"
  done
done
python - <<'PY'
import json, glob
for f in sorted(glob.glob('/tmp/o38J/p_*/profile_device.json')):
  for r in json.load(open(f)):
    dec=[k for k in r['kernels'] if 'paged_decode' in k['name']]
    print(f.split('/')[-2], r['model'], r['gemm'], 'kernels/step', r['kernels_per_step'], 'kernel ms', round(r['kernel_ms_per_step'],4), 'decode', [(k['name'][-30:], round(k['ms_per_step'],4)) for k in dec])
PY
tar czf $O/o38J.tgz -C /tmp o38J
