set -u
export PYTHONPATH=.
ONLY=gateup TAG=layout timeout 200 python tmp/gemm_bench.py > $OUT/layout.log 2>&1; echo "rc=$?"
python - $OUT/gemm_layout.jsonl <<'PY'
import json,sys
for l in open(sys.argv[1]):
  r=json.loads(l); print(f"{r['name']:16s} m={r['m']:4d} {r['us']:7.2f} us ({r['us_min']:.2f}-{r['us_max']:.2f}) | " + ", ".join(f"{k[:34]}={v}" for k,v in r['kernels'].items()))
PY
