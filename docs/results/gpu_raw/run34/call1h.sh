# Run34 call 1: cascade variants (casc_stream.py: parts on two streams, the q copy per chunk
# as before 8ccac52) at 100 x 5k, issue 13 item 1's step table (live / 40x / 100 GB pools,
# 64 x 512) at HEAD, then the cascade variants at 256 x 32k if time is left.
set -u
O=$OUT; OUT=/tmp/o34_1h; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=. PAXCACHE_COMMIT=$(cat tmp/run34/commit)
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
summ() { python - <<'P'
import json
for l in open('/tmp/o34_1h/casc_stream.jsonl'):
  r=json.loads(l); print(r['case'][:8], r['variant'], round(r['cascade_device_ms'],4), round(r['min_ms'],4), round(r['max_ms'],4), 'ov', r['overlap_us'], 'own', r['own_us'], 'sh', r['shared_kernel_us'], 'k', r['kernels'], 'd', r['max_abs_diff_vs_default'])
P
}
OUT_DIR=$OUT timeout 45 python tmp/run34/read_sizes.py > $OUT/read_sizes.log 2>&1; echo "read rc=$? $(( $(date +%s) - t0 ))s"; cut -c1-200 $OUT/read_sizes.log | tail -10
OUT_DIR=$OUT timeout 200 python tmp/run34/casc_stream.py 100x5000 > $OUT/casc_stream.log 2>&1; echo "casc rc=$? $(( $(date +%s) - t0 ))s"
grep -v "^{" $OUT/casc_stream.log | tail -12; summ
tar czf $O/o34_1h.tgz -C /tmp o34_1h
left=$(( 400 - ($(date +%s) - t0) ))
tar czf $O/o34_1h.tgz -C /tmp o34_1h
left=$(( 330 - ($(date +%s) - t0) ))
[ $left -gt 60 ] && { OUT_DIR=$OUT timeout $left python tmp/run34/casc_stream.py 256x32768 > $OUT/casc_stream256.log 2>&1; echo "casc256 rc=$? $(( $(date +%s) - t0 ))s"; grep -v "^{" $OUT/casc_stream256.log | tail -8; summ; }
tar czf $O/o34_1h.tgz -C /tmp o34_1h
