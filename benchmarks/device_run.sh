#!/usr/bin/env bash
# The GPU checks of this project, as one script for a lent accelerator (see README "Speed"):
# correctness against the float64 CPU reference, then the throughput and kernel-cost benchmarks.
# Needs wheels of what the machine lacks in .whl/ (datasets, dill, multiprocess, pyarrow), fetched here with
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp -d .whl \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 pyarrow==26.0.1
# and carried with the run (carry [".whl"]); writes to $OUT. The
# target folder must have "site-packages" in its path: dill pickles modules from anywhere else by value, and
# datasets fingerprints then fail on pyarrow types.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site-packages .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site-packages:$PWD PYTHONUNBUFFERED=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, datasets; print('torch', torch.__version__, 'transformers', transformers.__version__, 'datasets', datasets.__version__)"
python3 benchmarks/check_device.py 2>&1 | grep -v -i warn | tail -3
python3 benchmarks/bench_ches.py --shape qwen2.5-0.5b --dtype bfloat16 --pairs 512 --naive_pairs 128 --repeats 3 \
    --json "$OUT/bench_ches_gpu.json" 2>&1 | grep -v -i warn
python3 benchmarks/bench_ches.py --shape qwen2.5-0.5b --dtype bfloat16 --pairs 512 --naive_pairs 8 --repeats 3 \
    --batch_size 512 --json "$OUT/bench_ches_gpu_512.json" 2>&1 | grep -v -i warn
# prefix sharing on HH-RLHF-shaped pairs (long prompts): target map >= 1.3 x the padded limit's pairs/s
python3 benchmarks/bench_ches.py --shape qwen2.5-0.5b --dtype bfloat16 --data hh-shaped --pairs 512 --naive_pairs 8 \
    --repeats 3 --json "$OUT/bench_ches_gpu_hh.json" 2>&1 | grep -v -i warn
python3 benchmarks/bench_host.py --repeats 2 2>&1 | grep -v -i warn  # this host's tokenizer against an emulated device
python3 benchmarks/bench_kernel_cost.py --shape qwen2.5-0.5b --dtype bfloat16 --pairs 32 2>&1 | grep -v -i warn
