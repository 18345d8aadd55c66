# Run36 call B: the kernels of one cascade call at this commit (trace.py).
set -u
O=$OUT; OUT=/tmp/o36B; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
OUT_DIR=$OUT timeout 240 python tmp/run36/trace.py > $OUT/trace.log 2>&1; echo "rc=$?"; grep -v Warn $OUT/trace.log | tail -40
tar czf $O/o36B.tgz -C /tmp o36B
