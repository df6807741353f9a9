#!/usr/bin/env bash
# One prepared run on a lent GPU machine: the tiny preset on CUDA, generator and sampler throughput, and the
# generator quality sweep on Fashion-MNIST. Expects the Fashion-MNIST .gz files in .fmnist/ and writes to $OUT.
set -u
export PYTHONPATH=src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee $OUT/gpu.txt
python3 -c "import torch; print('torch', torch.__version__)" | tee -a $OUT/gpu.txt
( time python3 -m fedfactory.cli run --config tiny run.device=cuda run.out=/tmp/tiny ) > $OUT/tiny-cuda.log 2>&1
tail -8 $OUT/tiny-cuda.log; cp /tmp/tiny/metrics.json $OUT/tiny-cuda-metrics.json
python3 benchmarks/throughput.py --device cuda --out $OUT/throughput-cuda.json 2>&1 | tail -6
python3 benchmarks/sweep.py --dataset fashion-mnist --root .fmnist --device cuda --out /tmp/sweep --parallel 10 \
  --deadline "${SWEEP_DEADLINE:-330}" > $OUT/sweep.log 2>&1
tail -40 $OUT/sweep.log; cp /tmp/sweep/sweep.json $OUT/sweep.json
