#!/usr/bin/env bash
# The one prepared script for a GPU machine (issue 32), every figure as JSON and every log under $OUT
# (or bench/out), nothing from the network, about 8 minutes on an H100:
#   (a) `crossray run` of configs/tiny.yaml and configs/tiny-study.yaml end to end in a loopback-only
#       namespace, the launch reserving the GPU, and every stage's recorded device checked to be CUDA;
#   (b) B1 and B2 at the paper's width (n=3, D=2048, F=16384, B=4096; B2 with k=100): tokens/s and MFU;
#   (c) extraction at the paper's scale: tokens/s at sequence length 1024 through CheckpointSetExtractor,
#       bf16 and fp32 weights (fp32 under bf16 autocast), of 3 random GPT-NeoX of Pythia-1B's config
#       (bench/pythia-1b.json) at layer 9;
#   (d) integrated-gradients attribution on the same models, 10 steps, 16,384 latents: examples/s;
#   (e) throughput.json from (b)-(d), and `crossray plan configs/pythia-1b-study.yaml` from it beside
#       the plan from the assumed figures.
#
#     bash bench/gpu.sh            on a GPU machine, from the repository root
#     bash bench/gpu.sh --tiny     the same steps at tiny shapes on the CPU, (a) on the pipeline only and
#                                  expecting the CPU (the suite runs it, its run joining the suite's
#                                  Ray cluster through RAY_ADDRESS: tests/test_gpu_script.py)
#
# Python: $PY, else .venv/bin/python, else python3; (a) needs the project's packages (ray, mlflow,
# transformers), (b) only torch. A step that fails is reported and the others still run; the exit
# status is 1 if any failed.
set -uo pipefail
tiny=0
[ "${1:-}" = "--tiny" ] && tiny=1
out=$(mkdir -p "${OUT:-bench/out}" && cd "${OUT:-bench/out}" && pwd)
PY=${PY:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0 CROSSRAY_PROGRESS_SECONDS=${CROSSRAY_PROGRESS_SECONDS:-10}
if [ $tiny = 1 ]; then device=cpu; else device=cuda; fi
{ nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>/dev/null || echo "no GPU"
  "$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"; } | tee "$out/device.txt"
rm -f "$out/failed.txt"
started=$SECONDS
step() {  # name, seconds, command...: stdout to $out/name.out, stderr to $out/name.log
    local name=$1 limit=$2 t0=$SECONDS; shift 2
    echo "== $name"
    if ! timeout "$limit" "$@" > "$out/$name.out" 2> "$out/$name.log"; then
        echo "$name" >> "$out/failed.txt"; echo "$name FAILED (see $out/$name.log):"; tail -5 "$out/$name.log"
    fi
    echo "   $name: $((SECONDS - t0)) s"
}
offline=()  # Ray inside a loopback-only network namespace (environment.md), where unshare is allowed;
# with RAY_ADDRESS set the runs join that cluster (the suite's own), whose namespace is the caller's
[ -z "${RAY_ADDRESS:-}" ] && unshare -n true 2>/dev/null && offline=(unshare -n sh -c 'ip link set lo up && exec "$@"' sh)

# (a) the pipeline and the study, every stage on the device the launch reserves
if [ $tiny = 1 ]; then  # the pipeline only, as small as a whole run gets: one toy task, 20 steps
    runs=(tiny)
    toy=$("$PY" -c "from crossray.toy.build import ToyConfig, build_toy_family; print(build_toy_family(None, ToyConfig()))")
    launch=(--launch.actors 1 --launch.workers 1 --launch.cpus_per_actor 1.0 --launch.cpus_per_worker 1.0
            --pipeline.revisions step0,step128,step1000 --pipeline.screen_revisions step0,step128,step1000
            --pipeline.tasks "$toy/tasks/simple_agreement.jsonl" --pipeline.screen_examples 8 --extract.corpus.n_sequences 48
            --extract.shard_sequences 48 --extract.norm_sequences 48 --train.n_steps 20
            --train.batch_size 256 --train.checkpoint_every 20 --train.metrics_every 20
            --train.crosscoder.n_latents 64 --evaluate.eval_sequences 4 --attribution.steps 2
            --analysis.context_sequences 8)
else
    runs=(tiny tiny-study)
    # one GPU: 2 actors of a quarter each and one Train worker of half (two NCCL ranks cannot share a GPU)
    launch=(--launch.actors 2 --launch.gpus_per_actor 0.25 --launch.workers 1 --launch.gpus_per_worker 0.5)
fi
runs_on_the_device() {
    for name in "${runs[@]}"; do
        step "run-$name" 300 "${offline[@]}" "$PY" -m jobs.cli run "configs/$name.yaml" --json \
            --pipeline.out "$out/runs" --launch.register_name "gpu-sh-$name" "${launch[@]}"
        step "devices-$name" 30 "$PY" bench/gpu_summary.py devices "$out/run-$name.out" "$device"
        cat "$out/devices-$name.out"
    done
}
runs_on_the_device

# (b) B1 and B2 at the paper's width (tiny: small shapes)
bench() {  # name, seconds, command...: the benchmark's JSON in $out/name.json
    local name=$1 limit=$2; shift 2
    step "$name" "$limit" "$@" --out "$out/$name.json"
    [ -f "$out/$name.json" ] && "$PY" -c "
import json, sys
r = json.load(open(sys.argv[1]))
for x in r.get('results', [r]):
    print('  ', json.dumps({k: x.get(k) for k in ('shape', 'tokens_per_s', 'examples_per_s', 'model_flops_per_s',
                           'mfu', 'fraction_of_bf16_gemm_peak', 'peak_memory_gib') if k in x}))" "$out/$name.json"
}
if [ $tiny = 1 ]; then
    bench b1_paper 60 "$PY" bench/b1_train.py --shapes 3x64x256x128 --repeats 2
    bench b2_paper 60 "$PY" bench/b2_batchtopk.py --shape 3x64x256x128 --k 8 --repeats 2
    model=(--model bench/tiny-neox.json --layer 1 --n 2)
    extract=(--seq 64 --batch 2 --repeats 2)
    attribution=(--latents 64 --examples 2 --tokens 8 --repeats 2)
else
    bench b1_paper 150 "$PY" bench/b1_train.py --shapes 3x2048x16384x4096 --repeats 20
    bench b2_paper 150 "$PY" bench/b2_batchtopk.py --shape 3x2048x16384x4096 --k 100 --repeats 20
    model=(--model bench/pythia-1b.json --layer 9 --n 3)
    extract=(--seq 1024 --batch 4 --repeats 10)
    attribution=(--latents 16384 --examples 8 --tokens 32 --repeats 5)
fi

# (c) extraction and (d) attribution at the paper's scale (random weights run as fast as trained ones)
for dtype in bfloat16 float32; do
    bench "extract_$dtype" 180 "$PY" bench/b3_extract.py "${model[@]}" "${extract[@]}" --dtype "$dtype" --no-reference
done
bench attribution 180 "$PY" bench/b4_attribution.py "${model[@]}" "${attribution[@]}" --steps 10 --no-reference

# (e) the measured throughputs, and the paper study's plan from them beside the assumed one
step throughput 30 "$PY" bench/gpu_summary.py throughput "$out"
for plan in assumed measured; do
    flags=()
    [ $plan = measured ] && flags=(--throughput "$out/throughput.json")
    step "plan-$plan" 60 "$PY" -m crossray.cli plan configs/pythia-1b-study.yaml --json "${flags[@]}"
    "$PY" -c "
import json, sys
p = json.loads(open(sys.argv[1]).read().strip().splitlines()[-1])
print(f'   {sys.argv[2]}: {p[\"gpu_hours\"]:.3g} GPU hours', {k: round(v, 3) for k, v in p['gpu_hours_by_stage'].items()},
      'from', p['throughput']['source'], 'on', p['throughput']['device'])" "$out/plan-$plan.out" "$plan" 2>/dev/null
done
status=0
[ -s "$out/failed.txt" ] && status=1
echo "gpu.sh: $((SECONDS - started)) s, status $status$([ $status = 1 ] && echo ", failed: $(tr '\n' ' ' < "$out/failed.txt")"), everything under $out"
exit $status
