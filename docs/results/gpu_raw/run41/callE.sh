# Run41 call E: why the int8 step with the write in the kernel is slower on the H200 at
# 256 x 1024: the step's kernels with and without it (1B shape), then SmolLM2.
set -u
O=$OUT; OUT=/tmp/o41E; rm -rf $OUT; mkdir -p $OUT
export PYTHONUNBUFFERED=1 PYTHONPATH=.
t0=$(date +%s); nvidia-smi --query-gpu=name,memory.total --format=csv | tee $OUT/smi.txt
timeout 150 python -m tmp.run41.prof_fw $OUT/p llama-1b 256x1024 > $OUT/p1.log 2>&1; echo "1b rc=$? $(( $(date +%s) - t0 ))s"; cat $OUT/p1.log | grep -v "^I1\|^W1" | tail -30
tar czf $O/o41E.tgz -C /tmp o41E
