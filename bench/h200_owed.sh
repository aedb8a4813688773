#!/usr/bin/env bash
# The H200 measurements the open issues still owe (see the closing notes and docs/benchmarks.md), grouped
# into parts that each fit one 10-minute device call. Run from the repository root on the GPU machine:
#
#     bash bench/h200_owed.sh PART            # PART: suite spectests latent mixedgraphs alltests gputests devtests devtests2 engine speculative speculative2 paged hf decode megakernel kernels kernels24 prefill align moe parallel
#
# Outputs go to $OUT/<part>_*.txt (or bench/results/). Priorities when device time is short, in order
# (session 46, 2026-12-07: an H100 came once: `gputests` at 21c8e35 26 passed + 41 passed 2 skipped 1 failed (a test's
# Engine._launch wrapper took one argument; mended in c26c811, then 4 passed). Nothing owed but `decode` on an H200)
# (session 45, 2026-12-07: no GPU came (15 asks). Owed: `gputests` (session 44's list, plus softcap/window checks at
# the kernels' entry, kernel_step refused before Ampere, sampler.fit_vocab in sampling and draft rounds, int64 seeds))
# (session 44, 2026-12-07: no GPU came (~15 asks). Owed: `gputests` at the session's end (kernel-step availability by
# device, grouped_mm's device-side counts check, fallback notices, n samples of a request ended before its fork))
# (session 43, 2026-12-07: no H200 came (ten asks); on an H100 `gputests` (two processes, .whl carried) 42 passed
# 2 skipped + 26 passed at 267730f. Nothing owed but the goal, measured on an H200)
# (session 42, 2026-12-06: an H200 came on the fifth ask: `decode` 1,270 tok/s = 63.2% of its 2,009 tok/s roofline
# (goal 80%, unmet), then `gputests` on it at 93cb29a: 26 passed, 42 passed 2 skipped; on an H100 at ccae334 the
# same. Nothing owed but the goal)
# (session 41, 2026-12-06: no H200 came (nine asks); on an H100 `gputests` (two processes) 67 passed 2 skipped at
# 8f8057a. Owed: `decode` on an H200)
# (session 40, 2026-12-06: no H200 came (six asks); on an H100 `gputests` (two processes) 66 passed 2 skipped at
# 4a8e029 and 67 passed 2 skipped at 11bf188. Owed: `decode` on an H200)
# (session 39, 2026-12-06: no H200 came (six asks); on an H100 `gputests` (as two processes: tests/kernels and the
# rest) 66 passed 2 skipped at 77a3cf3. Owed: `decode` on an H200)
# (session 38, 2026-12-06: no H200 came (ten asks); on an H100 `gputests` 64 passed 2 skipped at 9aeaf60, and at
# 974bd68 63 passed with no failure before a 530 s cut (run it again whole). Owed: `decode` on an H200, `gputests`)
# (session 37, 2026-12-06: an H100 came once (asked as nvidia-h200): `decode` 72.5% of the H100's roofline, `gputests`
# 64 passed 1 skipped, MoE/MLA GPU tests passed (docs/benchmarks.md). Owed: `decode` on an H200 (never run there with
# the corrected bytes))
# (session 36, 2026-12-06: no GPU could be started all session (H200 and H100 asked ~10 times). Owed, unchanged:
# `decode` on an H200, then `gputests` on any GPU - now also for this session's GPU-touching changes: the
# penalties' incremental history (sampler.token_history, index_put_/_foreach_copy_ on the device), raw log-probs
# from the unmasked logits (Sampled.full, speculative verify rows, beam), copy-on-write of shared blocks)
# (session 35, 2026-12-05: no H200 came; on an H100 `gputests` (63 passed, 1 skipped), `decode` (72.8% of the H100's
# corrected roofline), `moe` and `kernels` (every variant's new check ok) ran - docs/benchmarks.md. Next, on an H200:
# `decode`, the goal's measurement with the corrected bytes, never yet run there)
# (session 34, 2026-12-05: no GPU ran. Next: `gputests` (the engine's per-request errors and delta hold-back,
# the MoE bias counted per step, all new since the last GPU run), then `decode` on an H200 - its % of roofline
# now counts one embedding row per token (2.069 GB, not 2.200) -, then `kernels` and `moe`, whose variants are
# now checked before they are timed (bf16 gates never run on a GPU: check a FAIL before believing it))
# (session 33, 2026-12-05: `gputests` ran alone on an H100 - 63 passed, 1 skipped -, then `speculative`,
# `mixedgraphs` and bench/decode.py on the same H100 (docs/benchmarks.md). Next, on an H200: `decode`)
# (session 32, 2026-12-05, on an H100 - no H200 came: `alltests` passed but for three `-m gpu` failures since fixed
# (docs/benchmarks.md, session 32): a stale token-tree test, and a kernel-step capture failing once with several
# processes on the GPU, whose fallback then broke every later random draw (lmforge.utils.capture_cuda_graph fixes
# the fallback; the failure's cause is open). Next: `gputests` (alone: `-m gpu` needs more than 540 s beside six other
# processes on a cold cache), `speculative`, `mixedgraphs`, `decode`)
# (session 31, 2026-12-05: `latent` ran - 42/42 tests, fp32 engine check equal, LATENT_KERNEL_AUTO now on; an
# `alltests` call was taken back mid-run. Next: `alltests` (now with the latent kernel the MLA default; includes the
# fp32 flash test never run), `gputests`, `speculative`, `mixedgraphs`, `decode`)
# (session 30, 2026-12-05: `latent` ran once - kernel 2.2-4.2x the gathered path, 40/42 tests with two test bugs
# since fixed - rerun it first: the fixed tests, the new default config, and the engine's fp32 kernel-vs-reference
# check that decides LATENT_KERNEL_AUTO; then session 29's list below without `latent`)
# (session 29, 2026-12-05, no GPU lent: first `latent` - MLA's new Triton latent kernel (decode rows, tree rows,
# the mixed graphs' varlen rows), never compiled on a GPU; opt-in until it passes there and measures faster than the
# gathered path, then set LATENT_KERNEL_AUTO = True in lmforge/infer/kv/paged.py - then session 28's order;
# alltests now also runs the fp32 hd-128 flash kernel, whose configs are fitted to shared memory
# (test_gpu_fp32_runs_the_kernel), and the latent kernel's tests)
# (session 28, 2026-12-05: first `speculative` - TreeDrafter's trees now drafted on the block pool and its graphs,
# the tree rows were 20-44 tok/s with the recomputing loop - then `mixedgraphs` again (mixed-step graphs now at the
# full table width, one per token bucket), then `alltests` (the paged kernels now read fp8/bf16 caches in q's dtype:
# bf16 q over fp8 keys compiles only on a GPU; tests/kernels/test_paged_attention.py) and `decode` (the decode
# kernel's last softmax step became a shared helper, _normalize: expect no change); spectests and mixedgraphs ran
# that session)
# (session 27, 2026-12-05: first `spectests` - verify chunks on captured graphs and the unordered-slots kernel test,
# never run on a GPU -, then `speculative` to measure them (its table now has the chain row without CUDA graphs
# too: the A/B in one call): the drafted rows were host-bound eager forwards, 0.49 ms of device time in 13.7 ms
# per token; docs/benchmarks.md; alltests and speculative2 ran that session)
# (session 25, 2026-12-04 late: first alltests - the GPU tests of KV policies and state caches never ran on a GPU -,
# then speculative and speculative2; the older order follows)
# (2026-12-04): suite after changes to code that picks the GPU by itself (the whole test suite; all passed on
# 2026-12-04), alltests after any change to a kernel or the engine's GPU paths (every kernel test module and -m gpu,
# seven processes at once, ~400 s; all passed on 2026-12-04), decode (--tune-step: 64.4-67.7% of the old 2.20 GB
# roofline, 60.6-63.7% of the 2.069 GB a step reads (bench.common.decode_weight_bytes, 2026-12-05), goal 80%;
# bench/decode_parts.py says where the
# step's time goes - attention's own chain ~4-4.5 us and each small GEMV's ramp/tail ~1-1.5 us per layer, a bare
# kernel boundary only 0.4-0.7 us; the one-launch and ticketed MLPs of bench/decode_mlp.py, L2 prefetches (own rows,
# next matrices, attention asking for the next weights), the persistent layer, attention + o fused, key tiles before
# the wait, attention's slices merged by the o-projection and whole short rows in one tile before the wait (no combine)
# all measured slower or no better; --attend / --compare
# A/B attention splits and whole config sets across --context), megakernel (the persistent warp-specialised CUDA
# prototype: 55-63% of the read stream, its dependency chain alone 192 us per token and its consumers alone ~400 us,
# 94% of the stream; -DTAGGED=1 (tags carried with the data instead of counters), -DLEAN=1 (fewer barriers per
# op) and -DPOLL_NS measured slower or level - rerun after changing it; -D flags vary the ring, the tiles, MMA and
# REDUCE), moe (eager goal met: 0.876x at 16k, 0.954-0.969x at 65k; compiled 0.803x at 16k, 0.884-0.893x at 65k),
# kernels/kernels24 (goals met with bf16_residual on 2026-12-03; rerun after changes to the model's forward or the
# Trainer step).
# paged, hf, align and parallel ran on 2026-12-02; engine, prefill and gputests on 2026-12-04 (docs/benchmarks.md).
# Rerun engine + gputests after any change to the engine's GPU paths. Keep each part's output in files under $OUT (a long
# tail of warnings can push a result out of the call's printed tail). Each call may land on another H200:
# compare variants within one call (plain 304M MFU spread 52.3-54.1% over three machines).
# The previous static-batch path for `engine`: before the call, snapshot the pre-engine package into an
# ignored folder that the device call carries (e.g. carry [".gpu"]):
#     mkdir -p .gpu/baseline && git archive e9e944e^ lmforge | tar -x -C .gpu/baseline
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
export PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" > /dev/null; then  # packages the device image lacks (tyro for the CLI, the data
    # extras), carried as wheels: see `suite` below; the device's torch, triton and transformers stay its own
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl && export PYTHONPATH=$PWD:/tmp/site
fi
run() {  # run NAME LIMIT_S CMD...: one row of the part, cut at its limit so the part's later rows still run
  local name=$1 limit=$2
  shift 2
  echo "=== $name: $*"
  timeout "$limit" "$@" 2>&1 | tee "$out/$name.txt" | tail -60
}
case "${1:-}" in
  gputests)  # every test marked gpu (kernels, engine backends, update_weights with graphs, MoE host syncs)
    # (without .whl carried the device lacks the CLI's tyro: its test module is left out, not the run)
    run gputests 540 python -m pytest -q -p no:cacheprovider -m gpu tests --continue-on-collection-errors ;;
  alltests)  # devtests, devtests2 and gputests at once: seven pytest processes side by side on the one GPU (Triton's
             # compiles, not the GPU, bound these runs; the machine has 16 cores), each cut at 540 s
    t=tests/kernels
    groups=("tests/infer/test_kernel_step.py tests/infer/test_decode_parts_bench.py $t/test_decode_mlp_bench.py"
            "$t/test_decode_kernels.py" "$t/test_decode_layer.py $t/test_paged_attention.py $t/test_paged_latent.py"
            "$t/test_rmsnorm.py $t/test_rope.py $t/test_swiglu.py $t/test_fused_ce.py $t/test_compiled_training.py"
            "$t/test_flash_attention.py" "$t/test_flash_in_model.py $t/test_moe_kernels.py")
    i=0
    for g in "${groups[@]}"; do
        i=$((i + 1))
        # shellcheck disable=SC2086  # the group's files are separate words on purpose
        timeout 540 python -m pytest -q -p no:cacheprovider --durations=5 $g > "$out/alltests_$i.txt" 2>&1 &
    done
    timeout 540 python -m pytest -q -p no:cacheprovider -m gpu tests --continue-on-collection-errors \
        > "$out/alltests_gpu.txt" 2>&1 &
    wait
    for f in "$out"/alltests_*.txt; do echo "=== $f"; grep -E "passed|failed|error|FAILED|ERROR" "$f" | tail -8; done ;;
  suite)     # the whole test suite on the GPU machine (tests that pick the GPU by themselves, e.g. the Trainer's
             # device "auto", meet CUDA numerics there; tests putting a Triton kernel on CPU tensors show on any CPU
             # with `TRITON_INTERPRET=0 pytest`). The kernel modules are alltests' (left out here). Eight processes
             # by directory, each cut at 540 s. Carry the CLI's and data extras' wheels (.whl, ignored by git):
             #   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
             #     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 -d .whl tyro docstring-parser \
             #     typeguard zstandard resiliparse fastwarc brotli
             # 2026-12-04: first run (no wheels) 30 failed + 57 errors; with the wheels and the fixes
             # (docs/benchmarks.md, "The whole test suite on the H200") every group passed. ~7 min.
    export PYTHONUNBUFFERED=1  # a group cut at its limit keeps what it printed
    shift
    groups=("tests/infer --ignore tests/infer/test_kernel_step.py --ignore tests/infer/test_decode_parts_bench.py"
            "tests/train --ignore tests/train/test_distributed.py" "tests/train/test_distributed.py"
            "tests/adapt tests/model" "tests/optim tests/scaling" "tests/align tests/tasks tests/integration"
            "tests/data tests/tokenizer $(echo tests/test_*.py)" "tests/parallel")
    [ $# -gt 0 ] && groups=("$@")  # `suite "GROUP" ...`: those groups only (a rerun of some files)
    i=0
    for g in "${groups[@]}"; do
        i=$((i + 1))
        # shellcheck disable=SC2086  # the group's paths are separate words on purpose
        timeout 540 python -m pytest -q -p no:cacheprovider --tb=short -rfE --durations=3 $g > "$out/suite_$i.txt" 2>&1 &
    done
    wait
    for f in "$out"/suite_*.txt; do echo "=== $f"; grep -E "^FAILED|^ERROR|passed|failed" "$f" | tail -25; done ;;
  devtests)  # the kernel modules' device-agnostic tests (DEV = cuda where there is one; in CI they run on the CPU
             # through Triton's interpreter), all of them, on the GPU: decode and inference kernels here, training
             # kernels in devtests2 (2026-12-04: the whole set in one call ran past 560 s, its first 63 tests passed)
    run devtests 560 python -m pytest -q -p no:cacheprovider --durations=10 tests/infer/test_kernel_step.py \
        tests/infer/test_decode_parts_bench.py tests/kernels/test_decode_kernels.py tests/kernels/test_decode_layer.py \
        tests/kernels/test_decode_mlp_bench.py tests/kernels/test_paged_attention.py tests/kernels/test_rmsnorm.py \
        tests/kernels/test_rope.py tests/kernels/test_swiglu.py ;;
  devtests2)
    run devtests2 560 python -m pytest -q -p no:cacheprovider --durations=10 tests/kernels/test_flash_attention.py \
        tests/kernels/test_flash_in_model.py tests/kernels/test_fused_ce.py tests/kernels/test_moe_kernels.py \
        tests/kernels/test_compiled_training.py ;;
  engine)    # issue 11: offline throughput vs roofline, KV utilisation, prefix caching on/off, batch 1, old path
    base=(); [ -d .gpu/baseline/lmforge ] && base=(--baseline-src .gpu/baseline)
    run engine_qwen 420 python bench/engine.py --shapes qwen3-0.6b \
        --sections check,offline,unfused,sync,fixed,batch1,prefix,baseline,profile "${base[@]}"
    run engine_llama 150 python bench/engine.py --shapes llama-1.1b --sections check,offline,unfused,sync,fixed,batch1
    run engine_host 60 python bench/engine_host.py --device cuda --vocab 151936 ;;
  spectests) # session 27's GPU-unrun tests: captured verify graphs (chains, trees, hidden states, paged heads), the
             # decode kernel's TREE rows and the kernels sharing its softmax step, the shared output buffers
    run spectests 400 python -m pytest -q -p no:cacheprovider tests/infer/test_speculative.py \
        tests/infer/test_kv_policy_unordered.py tests/infer/test_cuda_graph.py tests/infer/test_eagle_hidden.py \
        tests/infer/test_eagle_paged.py tests/kernels/test_paged_attention.py tests/kernels/test_decode_layer.py \
        tests/infer/test_kernel_step.py ;;
  mixedgraphs) # steps holding prefill chunks on CUDA graphs (EngineConfig.graph_prefill_tokens, the Triton varlen
             # kernel) vs eager: the kernel's tests, then time to first token alone and beside 32 decodes and a served
             # workload of staggered arrivals
    run mixed_tests 130 python -m pytest -q -p no:cacheprovider tests/kernels/test_paged_varlen.py \
        tests/infer/test_graph_prefill.py tests/infer/test_cuda_graph.py
    run graph_prefill 440 python bench/graph_prefill.py ;;
  latent)    # MLA's latent kernel (lmforge/kernels/paged_latent.py, 2026-12-05, never run on a GPU): its tests and
             # the engine's on the GPU, then decode rows vs the gathered eager path at DeepSeek-V2-Lite's attention
             # (batch 1-128, context 512-8192), a config sweep, and a mixed step's varlen rows
    run latent_tests 150 python -m pytest -q -p no:cacheprovider tests/kernels/test_paged_latent.py \
        tests/infer/test_latent_kernel.py tests/infer/test_graph_prefill.py
    run paged_latent 420 python bench/paged_latent.py --sweep ;;
  speculative)  # the drafted rows 8-40x slower than plain decoding (2026-12-04, not understood): the table with the
                # tree rows, then one prompt per variant under torch.profiler (kernels, syncs per token; traces in $OUT)
    run speculative 580 python bench/speculative.py --target-seconds 90 --draft-seconds 35 --ks 4 --prompts 3 \
        --profile --profile-tokens 64 ;;
  speculative2) # the same profile with SDPA kept off cuDNN (per-shape plans for the contiguous draft cache's masks?)
    run speculative2 580 python bench/speculative.py --target-seconds 90 --draft-seconds 35 --ks 4 --prompts 3 \
        --sdpa no-cudnn --profile --profile-tokens 64 ;;
  paged)     # issue 11: paged decode attention vs SDPA over a contiguous cache, slot- vs head-major pool
    run paged 300 python bench/paged_attention.py ;;
  hf)        # issue 11: HF generate() and HF's continuous batching on the same workload
    run engine_hf 420 python bench/engine.py --shapes qwen3-0.6b --sections hf,hf_batch ;;
  decode)    # issues 11 and 14: where the kernel step's time goes (each kind of kernel left out, tuned now), the
             # one-launch / ticketed MLP prototypes vs the two MLP kernels, and batch-1 decode through the
             # engine's backends, kernel step tuned (goal 80%)
    run decode_parts 260 python bench/decode_parts.py --tune
    run decode_mlp 120 python bench/decode_mlp.py
    run decode 270 python bench/decode.py --tune-step --hf default ;;
  kernels)   # issue 14: compiled training MFU at 304M (goal 55%), kernel table of the plain step; each variant compiles
    run train_kernels 580 python bench/train_kernels.py --sections mfu --depths 16 --budget 480 --profile \
        --mfu-variants plain,plain+bf16res,loss+cdt+bf16res --out "$out/train_kernels.json" ;;
  kernels24) # issue 14: the same at 834M (goal 58%)
    run train_kernels24 580 python bench/train_kernels.py --sections mfu --depths 24 --budget 480 \
        --mfu-variants plain,plain+bf16res,loss+bf16res --out "$out/train_kernels24.json" ;;
  prefill)   # issues 11 and 12: batched varlen prefill vs the per-sequence loop; packed rows on the kernel
    run prefill 300 python bench/prefill_attention.py
    run packed 280 python bench/attention.py --packed --seqs 2048,4096,8192 --max-seconds 240 ;;
  align)     # issue 12: SFT -> RM -> DPO family, and distillation from a better teacher, at H200 sizes
    run align_compare 290 python bench/align_compare.py --device cuda
    run align_distill 290 python bench/align_distill.py --device cuda ;;
  megakernel) # issue 14: the persistent warp-specialised decode prototype (bench/megakernel_proto.cu: 22 layers'
             # GEMV chain with real dependencies + an attention stand-in of 0 / 2 / 4.5 us per layer; diagnostics),
             # the default build (v7) and v5 in the same call; MK_FLAGS="-D..." adds a third build to compare
    nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/mk bench/megakernel_proto.cu && run megakernel 60 /tmp/mk 0 2000 4500
    nvcc -O3 -std=c++17 -arch=sm_90a -DMMA=0 -DREDUCE=0 -o /tmp/mk5 bench/megakernel_proto.cu &&
        run megakernel_v5 60 /tmp/mk5 0 2000 4500
    if [ -n "${MK_FLAGS:-}" ]; then
        # shellcheck disable=SC2086  # the flags are separate words on purpose
        nvcc -O3 -std=c++17 -arch=sm_90a $MK_FLAGS -o /tmp/mkx bench/megakernel_proto.cu && run megakernel_x 60 /tmp/mkx 0 2000 4500
    fi ;;
  moe)       # issue 14: dropless MoE variants vs dense at equal active FLOPs (goal >= 0.85x), host vs GPU time
    run moe_host 80 python bench/moe_step_host.py --profile --out "$out/moe_step_host.json"
    run moe 300 python bench/moe_kernels.py --sections train,profile --profile-step compiled --budget 260 \
        --out "$out/moe_kernels.json"
    run moe64 200 python bench/moe_kernels.py --sections train --train-batch 64 --budget 180 \
        --train-rows "triton dispatch, gemm auto" --out "$out/moe64.json" ;;
  parallel)  # issue 14: FSDP2 on one GPU vs the plain Trainer (the wrapper's overhead)
    run parallel 540 python bench/parallel.py --out "$out/parallel.json" ;;
  *) echo "usage: bash bench/h200_owed.sh suite|spectests|latent|mixedgraphs|alltests|gputests|devtests|devtests2|engine|speculative|speculative2|paged|hf|decode|megakernel|kernels|kernels24|prefill|align|moe|parallel" >&2; exit 2 ;;
esac
