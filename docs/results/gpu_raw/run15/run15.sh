set -u
export PYTHONPATH=.
for v in base nocublas; do
  if [ $v = base ]; then F=""; else F="--xla_gpu_enable_triton_gemm=false"; fi
  TAG=$v XLA_FLAGS="$F" timeout 250 python tmp/gemm_bench.py > $OUT/$v.log 2>&1
  echo "$v rc=$?"
  python - $OUT/gemm_$v.jsonl <<'PY'
import json,sys
for l in open(sys.argv[1]):
  r=json.loads(l); print(f"{r['name']:14s} m={r['m']:4d} {r['us']:7.2f} us ({r['us_min']:.2f}-{r['us_max']:.2f}) {r['weight_mb']:6.1f} MB {r['tbs']:5.2f} TB/s | " + ", ".join(f"{k[:28]}={v}" for k,v in r['kernels'].items()))
PY
done
