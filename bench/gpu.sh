#!/usr/bin/env bash
# B1 and B2 on a lent GPU, in one short call (benchmarks.md's "one H100" column): the paper's width
# (n=3, D=2048, F=16384, B=4096; B2 with k=100) and the CPU shapes, each JSON into $OUT (or bench/out).
# Needs only torch, numpy, safetensors and tqdm, which the GPU image has; runs from the repository root.
#
#     bash bench/gpu.sh
set -uo pipefail
out=${OUT:-bench/out}
mkdir -p "$out"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv | tee "$out/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$out/gpu.txt"
status=0
run() {  # name, seconds, command...
    local name=$1 limit=$2; shift 2
    echo "== $name"
    timeout "$limit" "$@" --out "$out/$name.json" > /dev/null 2> "$out/$name.err" || {
        status=1; echo "$name failed:"; tail -5 "$out/$name.err"; }
    [ -f "$out/$name.json" ] && python3 -c "
import json, sys
r = json.load(open(sys.argv[1]))
for x in r.get('results', [r]):
    print(json.dumps({k: x.get(k) for k in ('shape', 'equivalence_failed', 'tokens_per_s', 'speedup_median',
          'mfu', 'fraction_of_bf16_gemm_peak', 'peak_memory_gib')}))
    print('  profile', json.dumps(x['profile']['shares']))" "$out/$name.json"
}
run b1_paper 150 python3 bench/b1_train.py --shapes 3x2048x16384x4096 --repeats 20
run b2_paper 150 python3 bench/b2_batchtopk.py --shape 3x2048x16384x4096 --k 100 --repeats 20
run b1_cpu_shapes 90 python3 bench/b1_train.py --repeats 20
run b2_cpu_shape 60 python3 bench/b2_batchtopk.py --repeats 20
exit $status
