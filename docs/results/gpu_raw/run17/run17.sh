set -u
ROOT=$(pwd)
export PYTHONPATH=.
python -m pip install -q --no-deps tmp/whl/ml_collections-1.1.0-py3-none-any.whl 2>&1 | tail -1
ONLY=1 TAG=qkv timeout 120 python tmp/gemm_bench.py > $OUT/qkv.log 2>&1; echo "qkv rc=$?"
python - $OUT/gemm_qkv.jsonl <<'PY'
import json,sys
for l in open(sys.argv[1]):
  r=json.loads(l); print(f"{r['name']:14s} m={r['m']:4d} {r['us']:7.2f} us ({r['us_min']:.2f}-{r['us_max']:.2f}) {r['tbs']:5.2f} TB/s")
PY
i=0
for tree in b a b a; do
  i=$((i+1))
  cd $ROOT; if [ $tree = b ]; then cd tmp/qkvb; fi
  PYTHONPATH=. timeout 100 python -m experiments.bench.profile_step --out $OUT/q$i --device --steps 10 --top 12 --models llama-1b --shapes 64x512,256x1024 > $OUT/q$i.log 2>&1
  echo "prof $i $tree rc=$?"; grep -A5 "kernels/step" $OUT/q$i.log
done
