#!/usr/bin/env bash
# The GPU checks of issue 16 (section 5: speed, TFLOP/s and memory of S/B/L and their backbones; section 4:
# the cv loop against a bare loop) as one command for a lent GPU machine, well under its 10-minute limit.
# From a session with a device (the machine has torch, timm and lightning; the repository travels, ../shared
# does not, and nothing here needs it):
#   run(command="bash benchmarks/device_check.sh", timeout_s=570)
# Results land in $OUT (device_out/ when OUT is unset): speed_cuda.md, loop_overhead_cuda.md, log.txt; copy the
# two reports into benchmarks/results/ with the GPU's name. Each step has a time limit of its own, so one that
# hangs or fails still leaves the others' results; the log says which.
set -uo pipefail
out=${OUT:-device_out}
mkdir -p "$out"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
{
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || echo "nvidia-smi: not available"
    "$python" -c "import torch, timm, lightning; print('torch', torch.__version__, 'timm', timm.__version__, 'lightning', lightning.__version__, 'cuda', torch.cuda.is_available())"
    echo "== speed (bench_speed.py --device cuda)"
    timeout 330 "$python" benchmarks/bench_speed.py --device cuda --repeats 10 \
        --variants hsqformer_small,hsqformer_base,hsqformer_large --out "$out/speed_cuda.md"
    echo "speed: exit $?"
    echo "== loop (bench_loop.py --device cuda; the embedded sample, batch 16, 224 px as the issue's fold)"
    timeout 180 "$python" benchmarks/bench_loop.py --device cuda --epochs 3 --set augment.img_size=224 \
        --set model.kwargs.pretrained_backbones=false --out "$out/loop_overhead_cuda.md"
    echo "loop: exit $?"
} 2>&1 | tee "$out/log.txt"
