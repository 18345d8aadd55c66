# Run34 call 2 (H100): the cascade at 100 x 5k, the Mosaic shared part's query rows by the
# schedule's shift (HEAD) against the q copy per chunk (35939ba's code), alternating.
set -u
O=$OUT; OUT=/tmp/o34_2h; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run34/commit)
nvidia-smi --query-gpu=name --format=csv
OUT_DIR=$OUT ROUNDS=6 timeout 150 python tmp/run34/casc_stream.py 100x5000 > $OUT/casc_stream.log 2>&1; echo "casc rc=$?"
grep -v "^{" $OUT/casc_stream.log | grep -v "^    @" | tail -5
python - <<'P'
import json
for l in open('/tmp/o34_2h/casc_stream.jsonl'):
  r=json.loads(l); print(r['case'][:8], r['variant'], round(r['cascade_device_ms'],4), round(r['min_ms'],4), round(r['max_ms'],4), 'n', r['repeats'], 'own', r['own_us'], 'sh', r['shared_kernel_us'], 'k', r['kernels'], 'd', r['max_abs_diff_vs_default'])
P
tar czf $O/o34_2h.tgz -C /tmp o34_2h
