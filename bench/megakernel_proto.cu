// Batch-1 decode as one persistent CUDA kernel with warp-specialised weight streaming: a prototype that asks
// whether the schedule behind ~80% of memory bandwidth (issue 14's decode goal) is reachable on this GPU, before
// anything is built into lmforge. Standalone (no torch):
//
//     nvcc -O3 -std=c++17 -arch=sm_90a -o /tmp/mk bench/megakernel_proto.cu && /tmp/mk [attention_ns ...]
//
// What it runs: the weight stream of the 1.1B Llama shape's 22 layers (per layer: q/k/v 2560 x 2048, o 2048 x
// 2048, gate/up 2 x 5632 x 2048, down 2048 x 5632; bf16, 1.94 GB in all) as four GEMVs per layer with the real
// dependencies between them (each consumes all of the previous one's output; RMSNorm folded into q/k/v and
// gate/up, SwiGLU into the down projection's input, the residual adds into o and down), and attention as a
// stand-in: 32 per-head tasks that wait for q/k/v, spin for `attention_ns` (the chain the Triton step's attention
// takes, ~4.5 us per layer at 384 keys) and copy their head of q into the attention output. No RoPE, no KV cache,
// no head.
//
// The schedule (after Hazy Research's Llama-1B megakernel, 2025): one CTA per SM for the whole token. Each CTA
// walks the same list of tiles (layer by layer, op by op, tiles t = sm, sm + #SMs, ...). One producer warp
// streams the CTA's weight tiles into a ring of shared-memory stages with bulk asynchronous copies
// (cp.async.bulk + mbarrier), never waiting for activations - weights do not depend on them - only for a
// free stage. Consumer warps wait, per op, for a global counter saying every tile of the op it reads from is
// done (acquire), load their slice of that op's output into registers, do their tiles' dot products from the
// staged weights (on the tensor cores by default, -DMMA=1), sum the warps' partial sums in shared memory and store
// the SM's rows at the op's end (-DREDUCE=1; else atomic adds per tile), and add to their op's counter (release).
// So DRAM keeps streaming the next ops' weights while consumers wait out a dependency - what five separate
// kernels per layer cannot do past the first tile each program loads before its PDL wait.
//
// Each attention stand-in runs in several modes: weights streamed ahead (the design), "gated" (the producer also
// waits for each op's inputs before streaming its tiles, as separate kernels must past their first tile: the
// difference is what the run-ahead buys), and diagnostics with wrong values on purpose, each leaving out one
// more part: no input waits; nor input reads; nor arithmetic (the ring's bare stream); no weights at all (the
// dependency chain alone); and with no DRAM at all (the producer only signals its stages), the consumers' own
// time: all their work; without the partial sums' stores; without the arithmetic (the stage hand-offs); without
// the releases; without the tiles (each op's CTA barriers). A profiled launch then prints, per SM, the time in each
// wait and role. What it measured (2026-12-03, one H200) is in docs/benchmarks.md.
//
// It prints the tokens per second of the kernel and of a plain read stream, checks the kernel's final
// residual against a reference of simple kernels (one launch per op), and exits nonzero if a wait timed out
// (every spin has a ~200 ms watchdog, so a bug ends the run instead of hanging the GPU).
#define STR_(x) #x
#define STR(x) STR_(x)
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#define CHECK(x)                                                                                  \
  do {                                                                                            \
    cudaError_t e_ = (x);                                                                         \
    if (e_ != cudaSuccess) {                                                                      \
      fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_));          \
      exit(1);                                                                                    \
    }                                                                                             \
  } while (0)

constexpr int D = 2048, QKV = 2560, FF = 5632, HD = 64, LAYERS = 22;  // 32 heads of 64
// -DMMA=1: each tile is 8 rows multiplied on the tensor cores (mma.sync m16n8k16: bf16 in, fp32 accumulate) from a
// copy of the weights packed once in the instruction's operand order, instead of unpacked bf16 x fp32 FMAs; the down
// projection's rows are cut into DOWN_KPARTS column parts (a tile fits a stage; every SM gets one part's columns)
#ifndef MMA
#define MMA 1
#endif
#ifndef DOWN_KPARTS
#define DOWN_KPARTS 4
#endif
#ifndef NACC  // independent mma accumulators per warp and tile
#define NACC 4
#endif
#ifndef TPS  // MMA: tiles per ring stage (one wait and one release for all of them)
#define TPS 1
#endif
// the weight ring (192 KB per SM) and the rows per tile of each op, the best measured; -D... to vary them
#ifndef RING_STAGES
#define RING_STAGES 6
#endif
#ifndef STAGE_KB
#define STAGE_KB 32
#endif
#ifndef ROWS_QKV
#define ROWS_QKV (MMA ? 8 : 4)
#endif
#ifndef ROWS_O
#define ROWS_O (MMA ? 8 : 4)
#endif
#ifndef GU_PAIRS
#define GU_PAIRS 4
#endif
#ifndef ROWS_DOWN
#define ROWS_DOWN (MMA ? 8 : 2)
#endif
constexpr int STAGES = RING_STAGES, STAGE_BYTES = STAGE_KB * 1024;
#ifndef ROW_GROUPS  // 8 consumer warps split the columns; ROW_GROUPS such groups split each tile's rows
#define ROW_GROUPS 1
#endif
// -DWHOLE_TILES=1 (with MMA): each consumer warp takes whole tiles - all of a tile's columns, its own ring stage (as
// many consumer warps as stages, warp w always stage w, so a warp waits only on rounds of a stage it consumed
// before) - with the op's input as A fragments in shared memory, instead of a slice of every tile; a warp's rows
// are whole, so each goes out with one store (the down projection's parts still add)
#ifndef WHOLE_TILES
#define WHOLE_TILES 0
#endif
// -DREDUCE=1: the warps' partial sums go to shared memory and are summed at the op's end, one plain store per output
// row (an SM owns its tiles' rows; the MMA builds' down parts still add, one atomic per row and part) instead of an
// atomic add per row, warp and tile: the op's release then waits for far fewer writes in flight
#ifndef REDUCE  // (not with WHOLE_TILES: its rows are whole, there are no partial sums)
#define REDUCE (WHOLE_TILES ? 0 : 1)
#endif
// -DTAGGED=1 (MMA + REDUCE): an op hands its outputs on as 8-byte (value, tag) pairs - the tag names the launch,
// layer and op - and each reader spins on the pairs it needs until they carry the tag it expects (the "low-latency"
// protocol of NCCL's LL transport). No release fence, no counter: the dependency costs the writer's stores reaching
// L2 and the reader's loads, instead of stores -> fence -> counter add -> poll -> loads. The residual is kept as
// the o-projection's output (x + o, one SM per row) plus the down projection's DOWN_KPARTS partial outputs, summed
// by their readers, so no output is accumulated by atomics. Measured slower than the counters (session 17: the
// readers' re-loads of unwritten pairs and the five-source input of q/k/v cost more than the fences they replace).
#ifndef TAGGED
#define TAGGED 0
#endif
// -DLEAN=1 (MMA + REDUCE): fewer CTA barriers per op. Each warp's lane 0 polls the op's dependency itself (no barrier
// to pass the news on); warp 0 alone sums the partial sums, stores the SM's rows and releases the op, while the other
// warps go on to the next op (the partial sums double-buffered by op, so they cannot overwrite what warp 0 still
// reads); the o-projection's residual rows are loaded at the op's start instead of at its end.
#ifndef LEAN
#define LEAN 0
#endif
constexpr int MAXR = 128;  // REDUCE: an SM's rows of one op at most (checked on the host)
constexpr int COL_WARPS = 8, CONSUMER_WARPS = WHOLE_TILES ? RING_STAGES : COL_WARPS * ROW_GROUPS;
constexpr int THREADS = 32 * (CONSUMER_WARPS + 1);
constexpr int OPS = 5;  // per layer: 0 q/k/v, 1 attention (no weights), 2 o, 3 gate/up, 4 down
// -DFUSED_MLP=1: op 3 is gate/up and down in one (one dependency fewer per layer): a tile holds MLP_PAIRS gate rows,
// the same up rows and the same columns of down (stored transposed, as rows); each SM adds its tiles' down
// projections into the residual once, at the op's end. Op 4 is then empty.
#ifndef FUSED_MLP
#define FUSED_MLP 0
#endif
#ifndef MLP_PAIRS
#define MLP_PAIRS 2
#endif
constexpr int LAST_OP = FUSED_MLP ? 3 : 4;
static_assert(!FUSED_MLP || ROW_GROUPS == 1, "the fused MLP keeps one row group");
constexpr long long WATCHDOG_CYCLES = 400000000;  // ~0.2 s
#ifndef WATCH_EVERY  // polls between watchdog checks (each check reads the error flag from global memory)
#define WATCH_EVERY 256
#endif

// Each tile's rows are split by columns across the 8 consumer warps: warp w owns columns [w K/8, (w+1) K/8) of
// every row of every tile of an op, so a lane keeps its slice of the op's input in registers for the whole op
// (shared memory carries the weights only) and no barrier runs inside a tile. The warps' partial sums are summed in
// shared memory at the op's end (REDUCE) or go into the outputs by atomic adds (the residual for o and down; zeroed
// buffers for q/k/v and gate/up). SwiGLU is applied when the down projection loads its input. Rows per tile: q/k/v,
// o and down 8 (MMA) or 4, 4, 2; gate/up 4 gate rows then 4 up rows; then the K (columns) of each op's rows, and
// its outputs.
__host__ __device__ constexpr int rows_of(int op) {
  return op == 0 ? ROWS_QKV : op == 1 ? HD : op == 2 ? ROWS_O : op == 3 ? GU_PAIRS : ROWS_DOWN;
}
__host__ __device__ constexpr int kdim(int op) { return op == 1 ? 0 : op == 4 ? FF : D; }
__host__ __device__ constexpr int nout(int op) { return op == 0 ? QKV : op == 3 ? FF : D; }
__host__ __device__ constexpr int kparts(int op) { return MMA && op == 4 ? DOWN_KPARTS : 1; }  // tiles per row block
__host__ __device__ constexpr int ntiles(int op) {
  return FUSED_MLP && op == 4 ? 0 : FUSED_MLP && op == 3 ? FF / MLP_PAIRS : nout(op) / rows_of(op) * kparts(op);
}
__host__ __device__ constexpr int tile_rows_in_w(int op) {
  return FUSED_MLP && op == 3 ? 3 * MLP_PAIRS : op == 3 ? 2 * rows_of(op) : rows_of(op);
}
__host__ __device__ constexpr int tile_bytes(int op) { return tile_rows_in_w(op) * kdim(op) / kparts(op) * 2; }
static_assert(TPS * tile_bytes(0) <= STAGE_BYTES && TPS * tile_bytes(3) <= STAGE_BYTES && TPS * tile_bytes(4) <= STAGE_BYTES,
              "tiles per stage x tile bytes must fit a stage");
static_assert(TPS == 1 || MMA, "several tiles per stage: MMA builds only");
static_assert(!WHOLE_TILES || (MMA && TPS == 1 && !REDUCE), "WHOLE_TILES: MMA tiles, one per stage, no REDUCE");
static_assert(!REDUCE || (ROW_GROUPS == 1 && !FUSED_MLP), "REDUCE: one row group, unfused MLP");
static_assert(!TAGGED || (MMA && REDUCE && !WHOLE_TILES && TPS == 1), "TAGGED: MMA tiles with REDUCE, one per stage");
static_assert(!LEAN || (MMA && REDUCE && !WHOLE_TILES && !TAGGED), "LEAN: MMA tiles with REDUCE, counters");
static_assert(!MMA || (tile_rows_in_w(0) == 8 && tile_rows_in_w(2) == 8 && tile_rows_in_w(3) == 8 &&
                       tile_rows_in_w(4) == 8 && !FUSED_MLP && ROW_GROUPS == 1 && FF % (DOWN_KPARTS * 128) == 0),
              "MMA: 8-row tiles (GU_PAIRS 4), unfused, one row group, each down part a whole number of k16 steps per warp");
static_assert(D % (8 * COL_WARPS) == 0 && FF % (8 * COL_WARPS) == 0, "16-byte vectors per warp slice");

struct Weights {  // per layer; gate/up interleaved by tiles: tile t = GU_PAIRS gate rows then the same up rows
  const __nv_bfloat16* w[OPS];
};

struct Args {
  Weights layer[LAYERS];
  float* x;                  // (D,) the residual stream, fp32, updated in place
  float* qkv;                // (2, QKV) by layer parity; op 0 stores its rows (REDUCE) or adds into it, zeroed
                             // again by op 3 after attention
  float* attn;               // (D,)
  float* gu;                 // (2, 2 FF) gate then up pre-activations by layer parity; stored (REDUCE) or added
                             // into and zeroed by the next op 0
  unsigned long long *tq, *tattn, *txo, *tgu, *tdp;  // TAGGED: (value, tag) pairs of q/k/v (QKV), the attention
                             // output (D), x + o (D), gate/up (2 FF) and the down parts (DOWN_KPARTS, D); x holds the
                             // token's input, unchanged
  unsigned* counters;        // (LAYERS * OPS,) tiles done, cumulative over launches
  unsigned* reads;           // (LAYERS,) fused MLP: SMs that have read the op's input x (before any adds into it)
  unsigned gen;              // this launch's number (1, 2, ...): op k of layer l is done at gen * ntiles(k)
  long long attention_ns;    // the attention stand-in's spin
  int gated;                 // 1: the producer too waits for each op's inputs before streaming its tiles (what
                             // separate kernels do past their first tile): the A/B for the run-ahead. Diagnostics
                             // (wrong values): 2 nobody waits for inputs; 3 nor reads the input vector; 4 nor
                             // does the arithmetic (the ring's bare stream); 5 no weights at all: only the
                             // chain of input waits, input reads and releases (the dependency chain's floor);
                             // 6 as 3 but the producer reads nothing (the consumers' own speed, no DRAM); 7 as 6
                             // without the adds of the partial sums; 8 nor the arithmetic (the ring's hand-offs);
                             // 9 nor the releases; 10 nor the tiles (what is left: each op's CTA barriers)
  int* error;                // set by a watchdog
  unsigned long long* prof;  // (SMs, NPROF) clock cycles per role and wait, or null: see PROF_NAMES
};
constexpr int NPROF = 9;
const char* PROF_NAMES[NPROF] = {"kernel",        "input waits",     "input loads+rms", "ring waits (full)",
                                 "producer waits (empty)", "tile work", "op ends (releases)", "attention",
                                 "kernel (ns)"};
__device__ __forceinline__ void prof_add(const Args& a, int field, long long v) {  // consumer thread 0 / producer
  if (a.prof) a.prof[blockIdx.x * NPROF + field] += v;
}

// what a launch's mode leaves out (see Args::gated)
__device__ __forceinline__ bool waits_inputs(const Args& a) { return a.gated < 2 || a.gated == 5; }
__device__ __forceinline__ bool no_input(const Args& a) { return a.gated == 3 || a.gated == 4 || a.gated >= 6; }
__device__ __forceinline__ bool no_arith(const Args& a) { return a.gated == 4 || a.gated >= 8; }
__device__ __forceinline__ bool no_tiles(const Args& a) { return a.gated == 5 || a.gated == 10; }
__device__ __forceinline__ bool no_release(const Args& a) { return a.gated >= 9; }
__device__ __forceinline__ bool no_adds(const Args& a) { return a.gated == 4 || a.gated >= 7; }

// --- PTX helpers ------------------------------------------------------------------------------------------
__device__ __forceinline__ unsigned smem_addr(const void* p) {
  return static_cast<unsigned>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ long long now_ns() {
  long long t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_expect_tx(unsigned bar, unsigned bytes) {
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(unsigned bar, unsigned parity) {
  unsigned ok;
  asm volatile(
      "{ .reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p; }"
      : "=r"(ok)
      : "r"(bar), "r"(parity)
      : "memory");
  return ok;
}
// true (and the error flag set) once a wait has spun past the watchdog or another wait fired; it looks only every
// WATCH_EVERY polls, so a poll stays one load (a global read per poll would put a round trip in every wait)
__device__ __forceinline__ bool watchdog(long long c0, unsigned& polls, int* error) {
  if (++polls % WATCH_EVERY) return false;
  if (clock64() - c0 <= WATCHDOG_CYCLES && !*(volatile int*)error) return false;
  atomicExch(error, 1);
  return true;
}
__device__ __forceinline__ bool mbar_wait(unsigned bar, unsigned parity, int* error) {
  const long long c0 = clock64();
  unsigned polls = 0;
  while (!mbar_try_wait(bar, parity))
    if (watchdog(c0, polls, error)) return false;
  return true;
}
__device__ __forceinline__ void bulk_copy(unsigned dst, const void* src, unsigned bytes, unsigned bar) {
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(dst),
      "l"(src), "r"(bytes), "r"(bar)
      : "memory");
}
__device__ __forceinline__ unsigned load_acquire(const unsigned* p) {
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];" : "=r"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void add_release(unsigned* p, unsigned v) {
  asm volatile("red.release.gpu.global.add.u32 [%0], %1;" ::"l"(p), "r"(v) : "memory");
}
__device__ __forceinline__ void consumers_sync() {  // named barrier 1: the consumer warps only
  asm volatile("bar.sync 1, %0;" ::"n"(32 * CONSUMER_WARPS) : "memory");
}
// true on every consumer thread when v is true on any (named barrier 1 with an OR reduction)
__device__ __forceinline__ bool consumers_any(bool v) {
  unsigned r;
  asm volatile("{ .reg .pred p, q; setp.ne.u32 p, %1, 0; bar.red.or.pred q, 1, %2, p; selp.u32 %0, 1, 0, q; }"
               : "=r"(r)
               : "r"((unsigned)v), "n"(32 * CONSUMER_WARPS)
               : "memory");
  return r;
}

// TAGGED: the tag of op `op` of layer l in launch gen (never 0, what the buffers start as); a pair is the value's
// bits in the low word, the tag in the high one, written and read as one 8-byte access (single-copy atomic)
__device__ __forceinline__ unsigned tag_of(unsigned gen, int l, int op) { return gen * 128u + l * OPS + op; }
__device__ __forceinline__ void st_tagged(unsigned long long* p, float v, unsigned tag) {
  const unsigned long long u = (unsigned long long)tag << 32 | __float_as_uint(v);
  asm volatile("st.volatile.global.u64 [%0], %1;" ::"l"(p), "l"(u) : "memory");
}
__device__ __forceinline__ uint4 ld_pairs(const unsigned long long* p) {  // two pairs: x, z values; y, w tags
  uint4 v;
  asm volatile("ld.volatile.global.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p)
               : "memory");
  return v;
}
__device__ __forceinline__ bool tagged(uint4 v, unsigned tag) { return v.y == tag && v.w == tag; }

__device__ __forceinline__ bool wait_count(const Args& a, const unsigned* c, unsigned target);
// wait (one thread) until every tile of op `dep_op` of layer `dep_l` is done in this launch; false on a watchdog
__device__ __forceinline__ bool wait_done(const Args& a, int dep_l, int dep_op) {
  if (dep_l < 0) return true;
  return wait_count(a, a.counters + dep_l * OPS + dep_op, a.gen * ntiles(dep_op));
}
#ifndef POLL_NS  // -DPOLL_NS=n: a waiter sleeps n ns between polls of a counter (fewer loads on its L2 line)
#define POLL_NS 0
#endif
__device__ __forceinline__ bool wait_count(const Args& a, const unsigned* c, unsigned target) {
  const long long c0 = clock64();
  unsigned polls = 0;
  while (load_acquire(c) < target) {
    if (POLL_NS) __nanosleep(POLL_NS);
    if (watchdog(c0, polls, a.error)) return false;
  }
  return true;
}

__device__ __forceinline__ const __nv_bfloat16* tile_src(const Args& a, int layer, int op, int t) {
  return a.layer[layer].w[op] + (size_t)t * (tile_bytes(op) / 2);
}

__device__ __forceinline__ float dot8(uint4 q, const float* x) {  // 8 bf16 weights . 8 fp32 inputs
  // a bf16 is the top half of an fp32: the low one of a pair shifts up, the high one is masked
  const unsigned u[4] = {q.x, q.y, q.z, q.w};
  float acc = 0.f;
#pragma unroll
  for (int j = 0; j < 4; ++j)
    acc += __uint_as_float(u[j] << 16) * x[2 * j] + __uint_as_float(u[j] & 0xffff0000u) * x[2 * j + 1];
  return acc;
}

// Sum R per-lane values over the warp's 32 lanes, halving the set at each step (R - 1 + log2(32 / R) shuffles
// instead of 5 R): returns one row's sum; `row` is which, and lanes with lane % (32 / R) == 0 hold distinct rows.
template <int C>  // one step: the lanes with bit `o` set keep the upper half of the C values, the others the lower
__device__ __forceinline__ void halve(float* v, int lane, int o, int& row) {
  const bool upper = lane & o;
#pragma unroll
  for (int j = 0; j < C / 2; ++j) {
    const float send = upper ? v[j] : v[j + C / 2], keep = upper ? v[j + C / 2] : v[j];
    v[j] = keep + __shfl_xor_sync(0xffffffff, send, o);
  }
  if (upper) row += C / 2;
  if constexpr (C / 2 > 1) halve<C / 2>(v, lane, o / 2, row);
}
template <int R>
__device__ __forceinline__ float warp_sums(float (&v)[R], int lane, int& row) {
  static_assert(R >= 2 && R <= 32 && (R & (R - 1)) == 0, "R: a power of two up to 32");
  row = 0;
  halve<R>(v, lane, 16, row);
#pragma unroll
  for (int o = 16 / (R / 2) / 2; o; o >>= 1) v[0] += __shfl_xor_sync(0xffffffff, v[0], o);
  return v[0];
}

struct Shared {  // what the consumer warps share besides the ring
  unsigned char* ring;
  unsigned long long *full, *empty;
  float* partial;  // (CONSUMER_WARPS,) per-warp sums of squares for the RMS
  float* mlp;      // (2, COL_WARPS, 2 MLP_PAIRS) fused MLP: the warps' gate/up partial sums, by tile parity
  int* stop;       // read by all consumers after a barrier: they leave together on a watchdog
  unsigned* frag;  // MMA: (COL_WARPS, 16 steps, 4, 4) each warp's input as A fragments (bf16 hi / lo pairs)
  float* red;                  // REDUCE: (COL_WARPS, MAXR) the warps' partial sums of this SM's rows of the op
};

// RMSNorm's scale 1 / rms(x) from each lane's sum of squares over its share of x (the first NW warps' shares
// cover x once)
template <int NW>
__device__ __forceinline__ float rms_scale(const Shared& sh, float ss, int K) {
  for (int o = 16; o; o >>= 1) ss += __shfl_xor_sync(0xffffffff, ss, o);
  if (threadIdx.x % 32 == 0 && threadIdx.x / 32 < NW) sh.partial[threadIdx.x / 32] = ss;
  consumers_sync();
  float tot = 0.f;
#pragma unroll
  for (int w = 0; w < NW; ++w) tot += sh.partial[w];
  return rsqrtf(tot / K + 1e-5f);
}

// wait (thread 0) for the op this one reads; false when a watchdog fired (every consumer returns)
__device__ __forceinline__ bool op_start(const Args& a, const Shared& sh, int l, int op) {
  if (TAGGED) return true;  // the readers spin on the inputs themselves
  if (LEAN) {  // each warp's lane 0 waits; no CTA barrier
    bool ok = true;
    if (threadIdx.x % 32 == 0) {
      const long long c0 = clock64();
      ok = !waits_inputs(a) || wait_done(a, op == 0 ? l - 1 : l, op == 0 ? LAST_OP : op - 1);
      if (threadIdx.x == 0) prof_add(a, 1, clock64() - c0);
    }
    return __shfl_sync(0xffffffff, ok, 0);
  }
  if (threadIdx.x == 0) {
    const long long c0 = clock64();
    // a watchdog elsewhere shows here as this wait's own (no read of the error flag per op: a round trip each)
    *sh.stop = waits_inputs(a) && !wait_done(a, op == 0 ? l - 1 : l, op == 0 ? LAST_OP : op - 1);
    prof_add(a, 1, clock64() - c0);
  }
  consumers_sync();
  return !*sh.stop;
}
// one release per op and SM for all its tiles (a gpu-scope release waits for the writes before it)
// (the release is a gpu-scope fence - it waits until the SM's writes before it are performed - then the add)
__device__ __forceinline__ int my_tiles(int op, int slot) { return (ntiles(op) - slot + gridDim.x - 1) / gridDim.x; }
__device__ __forceinline__ void op_end(const Args& a, int l, int op, int slot) {
  const long long c0 = clock64();
  consumers_sync();
  if (threadIdx.x == 0 && !no_release(a) && !TAGGED) add_release(a.counters + l * OPS + op, my_tiles(op, slot));
  if (threadIdx.x == 0) prof_add(a, 6, clock64() - c0);
}

// the consumers' side of the ring: wait for tile i's stage (the wait profiled) -> its weights, null on a watchdog;
// c_t: when it arrived. Then release it once every lane of the warp has read it.
__device__ __forceinline__ const uint4* stage_in(const Args& a, const Shared& sh, unsigned i, long long& c_t) {
  const unsigned s = i % STAGES;
  const long long c_w = clock64();
  if (!mbar_wait(smem_addr(&sh.full[s]), (i / STAGES) & 1, a.error)) return nullptr;
  c_t = clock64();
  if (threadIdx.x == 0) prof_add(a, 3, c_t - c_w);
  return reinterpret_cast<const uint4*>(sh.ring + s * STAGE_BYTES);
}
__device__ __forceinline__ void stage_out(const Shared& sh, unsigned i) {
  __syncwarp();
  if (threadIdx.x % 32 == 0) mbar_arrive(smem_addr(&sh.empty[i % STAGES]));
}
// zero n floats of z across the grid (each SM a strided share)
__device__ __forceinline__ void zero_grid(float* z, int n) {
  for (int e = blockIdx.x * 32 * CONSUMER_WARPS + threadIdx.x; e < n; e += gridDim.x * 32 * CONSUMER_WARPS) z[e] = 0.f;
}

// The fused MLP's tiles (op 3 with FUSED_MLP): per tile, the gate/up dot products of its MLP_PAIRS rows (columns
// split over the warps, as in consume), one barrier to sum the warps' parts, SwiGLU, then each thread's 8 columns of
// the tile's down rows scaled by h; the down sums stay in registers over the SM's tiles and go into the residual at
// the end, once every SM has read x (the op's input).
__device__ __forceinline__ bool mlp_tiles(const Args& a, const Shared& sh, int l, unsigned& i, const float* xs) {
  constexpr int P = MLP_PAIRS, R = 2 * P, KV = D / 8;  // 16-byte vectors per row
  static_assert(!FUSED_MLP || 32 * CONSUMER_WARPS * 8 == D, "a thread per 8 columns of the down projection");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, sm = blockIdx.x, nsm = gridDim.x;
  if (threadIdx.x == 0 && !no_release(a)) add_release(a.reads + l, 1);  // every thread has read x (the RMS barrier)
  float y[8] = {0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f, 0.f};
  unsigned buf = 0;
  for (int t = sm; t < (no_tiles(a) ? 0 : ntiles(3)); t += nsm, ++i, buf ^= 1) {
    long long c_t;
    const uint4* w = stage_in(a, sh, i, c_t);
    if (!w) return false;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = no_arith(a) ? 0.f : dot8(w[r * KV + warp * 32 + lane], xs);
    int row;
    const float v = warp_sums<R>(acc, lane, row);
    float* part = sh.mlp + buf * COL_WARPS * R;
    if (lane % (32 / R) == 0) part[warp * R + row] = v;
    consumers_sync();
    float h[P];
#pragma unroll
    for (int j = 0; j < P; ++j) {
      float g = 0.f, u = 0.f;
#pragma unroll
      for (int w8 = 0; w8 < COL_WARPS; ++w8) g += part[w8 * R + j], u += part[w8 * R + P + j];
      h[j] = g / (1.f + __expf(-g)) * u;
    }
    if (!no_arith(a)) {
#pragma unroll
      for (int j = 0; j < P; ++j) {
        const uint4 q = w[(R + j) * KV + threadIdx.x];
        const unsigned u4[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          y[2 * e] += __uint_as_float(u4[e] << 16) * h[j];
          y[2 * e + 1] += __uint_as_float(u4[e] & 0xffff0000u) * h[j];
        }
      }
    }
    stage_out(sh, i);
    if (threadIdx.x == 0) prof_add(a, 5, clock64() - c_t);
  }
  if (threadIdx.x == 0)
    *sh.stop = waits_inputs(a) && !wait_count(a, a.reads + l, a.gen * nsm);
  consumers_sync();
  if (*sh.stop) return false;
  if (!no_adds(a) && a.gated != 5)
#pragma unroll
    for (int e = 0; e < 8; ++e) atomicAdd(a.x + 8 * threadIdx.x + e, y[e]);
  zero_grid(a.qkv + (l % 2) * QKV, QKV);  // the q/k/v buffer attention read this layer (as op 3 does unfused)
  op_end(a, l, 3, sm);
  return true;
}

// where row `row` of tile t of an op goes in its output (gate/up: the tile's first rows_of(3) rows are gate rows)
__host__ __device__ constexpr int out_index(int op, int t, int row) {
  return op == 3 && row >= rows_of(3) ? FF + t * rows_of(3) + row - rows_of(3) : t / kparts(op) * rows_of(op) + row;
}
// REDUCE: the partial sums of op `op` of layer l (LEAN: one of two buffers, alternating over the weight ops)
__device__ __forceinline__ float* red_of(const Shared& sh, int l, int op) {
  return sh.red + (LEAN ? (l * 4 + (op == 0 ? 0 : op - 1)) % 2 * COL_WARPS * MAXR : 0);
}
// REDUCE: a warp's partial sum for row `row` of its SM's j-th tile of the op
__device__ __forceinline__ void keep_partial(const Shared& sh, int l, int op, int j, int row, float y) {
  red_of(sh, l, op)[threadIdx.x / 32 * MAXR + j * tile_rows_in_w(op) + row] = y;
}
// TAGGED, the o-projection: the residual row o before layer l's o (x + o of layer l - 1 plus its down parts; layer
// 0: the token's input) as pairs, loaded at the op's start so the loads' latency hides behind the tiles
constexpr int NRP = 1 + DOWN_KPARTS;
__device__ __forceinline__ const unsigned long long* residual_src(const Args& a, int s, int o) {
  return s == 0 ? a.txo + o : a.tdp + (s - 1) * D + o;
}
__device__ __forceinline__ unsigned residual_tag(const Args& a, int l, int s) { return tag_of(a.gen, l - 1, s == 0 ? 2 : 4); }
__device__ __forceinline__ unsigned long long ld_pair(const unsigned long long* p) {
  unsigned long long v;
  asm volatile("ld.volatile.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
  return v;
}
__device__ __forceinline__ void residual_load(const Args& a, int l, int o, unsigned long long (&rp)[NRP]) {
#pragma unroll
  for (int s = 0; s < NRP; ++s)
    rp[s] = l > 0 ? ld_pair(residual_src(a, s, o))
                  : (unsigned long long)residual_tag(a, l, s) << 32 | __float_as_uint(s == 0 ? __ldcg(a.x + o) : 0.f);
}
__device__ __forceinline__ float residual_sum(const Args& a, int l, int o, unsigned long long (&rp)[NRP]) {
  const long long c0 = clock64();
  unsigned polls = 0;
  float v = 0.f;
#pragma unroll
  for (int s = 0; s < NRP; ++s) {  // written before this layer's q/k/v read them: a wait here is a bug's
    while (waits_inputs(a) && (unsigned)(rp[s] >> 32) != residual_tag(a, l, s)) {
      if (watchdog(c0, polls, a.error)) return 0.f;
      rp[s] = ld_pair(residual_src(a, s, o));
    }
    v += __uint_as_float((unsigned)rp[s]);
  }
  return v;
}
// LEAN, the o-projection: warp 0's residual rows (e = lane + 32 k of the SM's rows), loaded at the op's start
constexpr int NRES = MAXR / 32;
__device__ __forceinline__ void residual_rows(const Args& a, float (&res)[NRES]) {
  constexpr int RT = tile_rows_in_w(2);
  const int sm = blockIdx.x, nsm = gridDim.x, n = my_tiles(2, sm) * RT, lane = threadIdx.x % 32;
#pragma unroll
  for (int k = 0; k < NRES; ++k) {
    const int e = lane + 32 * k;
    res[k] = e < n ? __ldcg(a.x + out_index(2, sm + e / RT * nsm, e % RT)) : 0.f;
  }
}
// REDUCE, at the op's end: each of this SM's rows summed over the warps and stored (residual rows read-modify-
// written: the SM owns them; the MMA builds' down parts added). LEAN: by warp 0, which then releases the op.
template <int OP>
__device__ __forceinline__ void store_rows(const Args& a, const Shared& sh, int l, unsigned long long (&rp)[NRP],
                                           const float (&res)[NRES]) {
  constexpr int RT = tile_rows_in_w(OP);
  const int sm = blockIdx.x, nsm = gridDim.x, n = my_tiles(OP, sm) * RT;
  const float* red = red_of(sh, l, OP);
  consumers_sync();
  if constexpr (LEAN) {
    if (threadIdx.x >= 32) return;  // the other warps go on
    const long long c0 = clock64();
    float* out = OP == 0 ? a.qkv + (l % 2) * QKV : OP == 3 ? a.gu + (l % 2) * 2 * FF : a.x;
    if (!(no_arith(a) || no_adds(a) || no_tiles(a))) {
#pragma unroll
      for (int k = 0; k < NRES; ++k) {
        const int e = threadIdx.x + 32 * k;
        if (e >= n) break;
        float v = 0.f;
#pragma unroll
        for (int w = 0; w < COL_WARPS; ++w) v += red[w * MAXR + e];
        const int o = out_index(OP, sm + e / RT * nsm, e % RT);
        if (OP == 4 && kparts(4) > 1) atomicAdd(out + o, v);
        else if (OP == 2) out[o] = res[k] + v;
        else if (OP == 4) out[o] = __ldcg(out + o) + v;
        else out[o] = v;
      }
    }
    __syncwarp();
    if (threadIdx.x == 0 && !no_release(a)) add_release(a.counters + l * OPS + OP, my_tiles(OP, sm));
    if (threadIdx.x == 0) prof_add(a, 6, clock64() - c0);
    return;
  }
  if constexpr (TAGGED) {  // every row goes out as a pair, values or not, so the readers' chain goes on
    if (no_release(a)) return;
    const bool vals = !(no_arith(a) || no_adds(a) || no_tiles(a));
    const unsigned tag = tag_of(a.gen, l, OP);
    for (int e = threadIdx.x; e < n; e += 32 * CONSUMER_WARPS) {
      float v = 0.f;
      if (vals)
#pragma unroll
        for (int w = 0; w < COL_WARPS; ++w) v += red[w * MAXR + e];
      const int o = out_index(OP, sm + e / RT * nsm, e % RT);
      if (OP == 0) st_tagged(a.tq + o, v, tag);
      else if (OP == 3) st_tagged(a.tgu + o, v, tag);
      else if (OP == 4) st_tagged(a.tdp + sm % DOWN_KPARTS * D + o, v, tag);
      else st_tagged(a.txo + o, residual_sum(a, l, o, rp) + v, tag);
    }
    return;
  }
  if (no_arith(a) || no_adds(a) || no_tiles(a)) return;
  float* out = OP == 0 ? a.qkv + (l % 2) * QKV : OP == 3 ? a.gu + (l % 2) * 2 * FF : a.x;
  for (int e = threadIdx.x; e < n; e += 32 * CONSUMER_WARPS) {
    float v = 0.f;
#pragma unroll
    for (int w = 0; w < COL_WARPS; ++w) v += red[w * MAXR + e];
    const int o = out_index(OP, sm + e / RT * nsm, e % RT);
    if (OP == 4 && kparts(4) > 1) atomicAdd(out + o, v);
    else if (OP == 2 || OP == 4) out[o] = __ldcg(out + o) + v;
    else out[o] = v;
  }
}

// one weight op of layer l on this SM's tiles; i counts the weight tiles consumed (the ring's position)
template <int OP>
__device__ __forceinline__ bool consume(const Args& a, const Shared& sh, int l, unsigned& i) {
  constexpr int K = kdim(OP), KP = K / COL_WARPS, NV = KP / 8, VL = (NV + 31) / 32;
  // rows per warp: its group's share of the tile (the fused MLP returns before the tile loop: any valid R there)
  constexpr int R = FUSED_MLP && OP == 3 ? 2 : tile_rows_in_w(OP) / ROW_GROUPS;
  const int lane = threadIdx.x % 32, sm = blockIdx.x, nsm = gridDim.x;
  const int warp = threadIdx.x / 32 % COL_WARPS, group = threadIdx.x / 32 / COL_WARPS;  // columns, rows
  if (!op_start(a, sh, l, OP)) return false;
  const long long c_in = clock64();
  // this lane's slice of the input: vectors v = lane + 32 j of the warp's columns, 8 floats each
  float xs[VL][8];
  const int col0 = warp * KP;
#pragma unroll
  for (int j = 0; j < VL; ++j) {
    const int v = lane + 32 * j;
#pragma unroll
    for (int e = 0; e < 8; ++e) xs[j][e] = 1.f;
    if (v >= NV || no_input(a)) continue;
    const int c = col0 + 8 * v;
    float4 p0, p1;
    if (OP == 4) {  // SwiGLU of the gate/up pre-activations
      const float* g = a.gu + (l % 2) * 2 * FF + c;
      const float4 g0 = __ldcg(reinterpret_cast<const float4*>(g)), g1 = __ldcg(reinterpret_cast<const float4*>(g + 4));
      const float4 u0 = __ldcg(reinterpret_cast<const float4*>(g + FF));
      const float4 u1 = __ldcg(reinterpret_cast<const float4*>(g + FF + 4));
      auto sw = [](float gv, float uv) { return gv / (1.f + __expf(-gv)) * uv; };
      p0 = make_float4(sw(g0.x, u0.x), sw(g0.y, u0.y), sw(g0.z, u0.z), sw(g0.w, u0.w));
      p1 = make_float4(sw(g1.x, u1.x), sw(g1.y, u1.y), sw(g1.z, u1.z), sw(g1.w, u1.w));
    } else {
      const float* src = (OP == 2 ? a.attn : a.x) + c;
      p0 = __ldcg(reinterpret_cast<const float4*>(src));
      p1 = __ldcg(reinterpret_cast<const float4*>(src + 4));
    }
    xs[j][0] = p0.x, xs[j][1] = p0.y, xs[j][2] = p0.z, xs[j][3] = p0.w;
    xs[j][4] = p1.x, xs[j][5] = p1.y, xs[j][6] = p1.z, xs[j][7] = p1.w;
  }
  if (OP == 0 || OP == 3) {  // RMSNorm: the slices cover x once
    float ss = 0.f;
#pragma unroll
    for (int e = 0; e < 8; ++e) ss += xs[0][e] * xs[0][e];
    const float inv = rms_scale<COL_WARPS>(sh, ss, K);
#pragma unroll
    for (int e = 0; e < 8; ++e) xs[0][e] *= inv;
  }
  if (threadIdx.x == 0) prof_add(a, 2, clock64() - c_in);
  if constexpr (FUSED_MLP && OP == 3) return mlp_tiles(a, sh, l, i, xs[0]);
  float* out = OP == 0 ? a.qkv + (l % 2) * QKV : OP == 3 ? a.gu + (l % 2) * 2 * FF : a.x;
  for (int t = sm; t < (no_tiles(a) ? 0 : ntiles(OP)); t += nsm, ++i) {
    long long c_t;
    const uint4* w = stage_in(a, sh, i, c_t);
    if (!w) return false;
    float acc[R];
#pragma unroll
    for (int r = 0; r < R; ++r) acc[r] = 0.f;
    if (!no_arith(a)) {
#pragma unroll
      for (int j = 0; j < VL; ++j) {
        const int v = lane + 32 * j;
        if (v < NV) {
#pragma unroll
          for (int r = 0; r < R; ++r) acc[r] += dot8(w[(group * R + r) * (K / 8) + warp * NV + v], xs[j]);
        }
      }
    }
    stage_out(sh, i);
    if (no_arith(a)) continue;
    int row;
    const float y = warp_sums<R>(acc, lane, row);
    row += group * R;
    if (lane % (32 / R) == 0 && (!no_adds(a) || y == 0x1p100f)) {  // (mode 7 keeps the sums alive, adds nothing)
      if (REDUCE) keep_partial(sh, l, OP, (t - sm) / nsm, row, y);
      else atomicAdd(out + out_index(OP, t, row), y);
    }
    if (threadIdx.x == 0) prof_add(a, 5, clock64() - c_t);
  }
  if (REDUCE) {
    unsigned long long rp[NRP];  // store_rows' residual rows of TAGGED (rp) and LEAN (res): neither with FMA tiles
    const float res[NRES] = {};
    store_rows<OP>(a, sh, l, rp, res);
  } else {  // zero what two ops later will add into, now that its readers are done: op 0 the gate/up buffer down
            // read last layer, op 3 the q/k/v buffer attention read this layer
    if (OP == 0) zero_grid(a.gu + ((l + 1) % 2) * 2 * FF, 2 * FF);
    if (OP == 3) zero_grid(a.qkv + (l % 2) * QKV, QKV);
  }
  op_end(a, l, OP, sm);
  return true;
}

// -DMMA=1: one weight op of layer l on the tensor cores. A tile is 8 rows (4 gate + 4 up rows for gate/up) by K
// columns (a quarter of the down projection's: every SM gets the same part of h, as nsm % DOWN_KPARTS == 0); warp
// w takes k16 steps [w S, (w + 1) S). mma.sync m16n8k16 with the weights as B (k16 x n8: the tile's 8 rows) and the
// input as A, its 16 rows all the same vector split in two: rows 0-7 the input rounded to bf16 (hi), rows 8-15 what
// the rounding lost (lo), so C's rows g and g + 8 add up to W x at ~16 bits of the input's mantissa. The packed
// weights give each lane its B fragment as one 8-byte shared-memory load per step (a warp reads 256 contiguous
// bytes: no bank conflicts).
__device__ __forceinline__ unsigned pack_bf16(float lo_k, float hi_k) {  // element k in the low half, k + 1 high
  __nv_bfloat162 v = __floats2bfloat162_rn(lo_k, hi_k);
  return *reinterpret_cast<unsigned*>(&v);
}
__device__ __forceinline__ void mma_bf16(float (&c)[4], const unsigned (&a)[4], uint2 b) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
}
// TAGGED: the float4s of the op's input (as stage_input's loop) from its producers' (value, tag) pairs, spinning
// until every pair carries its tag (unless the mode skips input waits); false if the watchdog fired. q/k/v reads
// x + o of the last layer plus its down parts (layer 0: the token's input), o the attention output, gate/up x + o,
// down gate and up (SwiGLU).
template <int OP, int VL>
__device__ __forceinline__ bool tagged_input(const Args& a, int l, int col0, int v0, int stride, int nv4, float4 (&xv)[VL]) {
  if (OP == 0 && l == 0) {
#pragma unroll
    for (int j = 0; j < VL; ++j)
      if (v0 + stride * j < nv4) xv[j] = __ldcg(reinterpret_cast<const float4*>(a.x + col0 + 4 * (v0 + stride * j)));
    return true;
  }
  constexpr int NS = OP == 0 ? 1 + DOWN_KPARTS : OP == 4 ? 2 : 1;  // sources per element
  auto source = [&](int s, int c) -> const unsigned long long* {
    if (OP == 0) return s == 0 ? a.txo + c : a.tdp + (s - 1) * D + c;
    if (OP == 2) return a.tattn + c;
    if (OP == 3) return a.txo + c;
    return a.tgu + s * FF + c;
  };
  auto tag = [&](int s) { return OP == 0 ? tag_of(a.gen, l - 1, s == 0 ? 2 : 4) : tag_of(a.gen, l, OP - 1); };
  uint4 u[VL][NS][2] = {};  // tag 0 is nobody's: the first pass loads every pair
  const long long c0 = clock64();
  unsigned polls = 0;
  for (bool wait = waits_inputs(a), first = true;; first = false) {  // check every pair; load those not yet written
    bool ok = !first;
#pragma unroll
    for (int j = 0; j < VL; ++j)
#pragma unroll
      for (int s = 0; s < NS; ++s)
#pragma unroll
        for (int h = 0; h < 2; ++h)
          if (v0 + stride * j < nv4 && !tagged(u[j][s][h], tag(s))) {
            ok = false;
            u[j][s][h] = ld_pairs(source(s, col0 + 4 * (v0 + stride * j) + 2 * h));
          }
    if (ok || (!wait && !first)) break;
    if (!first && watchdog(c0, polls, a.error)) return false;
  }
#pragma unroll
  for (int j = 0; j < VL; ++j) {
    float e[4] = {0.f, 0.f, 0.f, 0.f};
    if (OP == 4) {
      auto sw = [](unsigned g_, unsigned u_) {
        const float g = __uint_as_float(g_);
        return g / (1.f + __expf(-g)) * __uint_as_float(u_);
      };
      e[0] = sw(u[j][0][0].x, u[j][NS - 1][0].x), e[1] = sw(u[j][0][0].z, u[j][NS - 1][0].z);
      e[2] = sw(u[j][0][1].x, u[j][NS - 1][1].x), e[3] = sw(u[j][0][1].z, u[j][NS - 1][1].z);
    } else {
#pragma unroll
      for (int s = 0; s < NS; ++s) {
        e[0] += __uint_as_float(u[j][s][0].x), e[1] += __uint_as_float(u[j][s][0].z);
        e[2] += __uint_as_float(u[j][s][1].x), e[3] += __uint_as_float(u[j][s][1].z);
      }
    }
    if (v0 + stride * j < nv4) xv[j] = make_float4(e[0], e[1], e[2], e[3]);
  }
  return true;
}

// The op's input (SwiGLU of gate/up for down; ones in the modes without input reads) at float4s v = v0 + stride j
// (j < VL, v < nv4) of columns [col0, col0 + 4 nv4), scaled by RMSNorm for q/k/v and gate/up (the first NW warps'
// float4s cover x once), written into fr as A fragments [k16 step][q][4 words]: float4 v holds step v / 4's column
// pairs p = 2 (v % 4), + 1, which lane q = p % 4 takes as words (p / 4) * 2 (bf16 hi) and + 1 (what hi lost, lo)
template <int OP, int VL, int NW>
__device__ __forceinline__ void stage_input(const Args& a, const Shared& sh, int l, int col0, int v0, int stride, int nv4,
                                            unsigned* fr, bool& bad) {
  float4 xv[VL];
#pragma unroll
  for (int j = 0; j < VL; ++j) xv[j] = make_float4(1.f, 1.f, 1.f, 1.f);
  if (TAGGED && !no_input(a)) {
    const long long c_w = clock64();
    bad = !tagged_input<OP, VL>(a, l, col0, v0, stride, nv4, xv);
    if (threadIdx.x == 0) prof_add(a, 1, clock64() - c_w);
  }
#pragma unroll
  for (int j = 0; j < VL; ++j) {
    const int v = v0 + stride * j, c = col0 + 4 * v;
    if (TAGGED || v >= nv4 || no_input(a)) continue;
    if (OP == 4) {
      const float* gp = a.gu + (l % 2) * 2 * FF + c;
      const float4 gv = __ldcg(reinterpret_cast<const float4*>(gp)), uv = __ldcg(reinterpret_cast<const float4*>(gp + FF));
      auto sw = [](float g_, float u_) { return g_ / (1.f + __expf(-g_)) * u_; };
      xv[j] = make_float4(sw(gv.x, uv.x), sw(gv.y, uv.y), sw(gv.z, uv.z), sw(gv.w, uv.w));
    } else {
      xv[j] = __ldcg(reinterpret_cast<const float4*>((OP == 2 ? a.attn : a.x) + c));
    }
  }
  if (OP == 0 || OP == 3) {
    float ss = 0.f;
#pragma unroll
    for (int j = 0; j < VL; ++j)
      if (v0 + stride * j < nv4) ss += xv[j].x * xv[j].x + xv[j].y * xv[j].y + xv[j].z * xv[j].z + xv[j].w * xv[j].w;
    const float inv = rms_scale<NW>(sh, ss, D);
#pragma unroll
    for (int j = 0; j < VL; ++j) xv[j].x *= inv, xv[j].y *= inv, xv[j].z *= inv, xv[j].w *= inv;
  }
#pragma unroll
  for (int j = 0; j < VL; ++j) {
    const int v = v0 + stride * j;
    if (v >= nv4) continue;
    const float e[4] = {xv[j].x, xv[j].y, xv[j].z, xv[j].w};
#pragma unroll
    for (int pp = 0; pp < 2; ++pp) {
      const int p = 2 * (v % 4) + pp, at = (v / 4 * 4 + p % 4) * 4 + p / 4 * 2;
      const float x0 = e[2 * pp], x1 = e[2 * pp + 1];
      fr[at] = pack_bf16(x0, x1);
      fr[at + 1] = pack_bf16(x0 - __bfloat162float(__float2bfloat16_rn(x0)), x1 - __bfloat162float(__float2bfloat16_rn(x1)));
    }
  }
}

template <int OP>
__device__ __forceinline__ bool consume_mma(const Args& a, const Shared& sh, int l, unsigned& i) {
  constexpr int K = kdim(OP) / kparts(OP), S = K / 16 / COL_WARPS;  // columns per tile, k16 steps per warp
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, sm = blockIdx.x, nsm = gridDim.x;
  const int g = lane / 4, q = lane % 4;  // the fragment's group (a row of A / a column of B) and thread in group
  if (!op_start(a, sh, l, OP)) return false;
  const long long c_in = clock64();
  // the warp's KS columns of the input, coalesced (float4 v = lane + 32 j), as A fragments in its shared-memory slot
  constexpr int KS = S * 16, NV4 = KS / 4;
  unsigned* fr = sh.frag + warp * 16 * 16;
  __syncwarp();
  bool bad = false;
  stage_input<OP, (NV4 + 31) / 32, COL_WARPS>(a, sh, l, (OP == 4 ? sm % DOWN_KPARTS * K : 0) + warp * KS, lane, 32, NV4, fr,
                                             bad);
  unsigned long long rp[NRP] = {};  // TAGGED, o: the residual of the rows this thread stores at the op's end
  if (TAGGED && OP == 2 && !no_input(a) && threadIdx.x < my_tiles(OP, sm) * tile_rows_in_w(OP))
    residual_load(a, l, out_index(OP, sm + threadIdx.x / tile_rows_in_w(OP) * nsm, threadIdx.x % tile_rows_in_w(OP)), rp);
  if (TAGGED) {
    if (consumers_any(bad)) return false;
  } else {
    __syncwarp();
  }
  float res[NRES] = {};  // LEAN, o: warp 0's residual rows
  if (LEAN && OP == 2 && threadIdx.x < 32 && !no_input(a)) residual_rows(a, res);
  unsigned xa[S][4];  // (row g: hi of columns 2q, 2q + 1), (row g + 8: lo), (row g: hi of 2q + 8, + 9), (lo)
#pragma unroll
  for (int s = 0; s < S; ++s) {
    const uint4 f = reinterpret_cast<const uint4*>(fr)[s * 4 + q];
    xa[s][0] = f.x, xa[s][1] = f.y, xa[s][2] = f.z, xa[s][3] = f.w;
  }
  if (threadIdx.x == 0) prof_add(a, 2, clock64() - c_in);
  float* out = OP == 0 ? a.qkv + (l % 2) * QKV : OP == 3 ? a.gu + (l % 2) * 2 * FF : a.x;
  for (int t0 = sm; t0 < (no_tiles(a) ? 0 : ntiles(OP)); t0 += nsm * TPS, ++i) {  // a stage: TPS tiles
    long long c_t;
    const uint4* w = stage_in(a, sh, i, c_t);
    if (!w) return false;
    float c[TPS][NACC][4];  // independent accumulators: a shorter dependent chain of mma
#pragma unroll
    for (int u = 0; u < TPS; ++u)
#pragma unroll
      for (int n = 0; n < NACC; ++n) c[u][n][0] = c[u][n][1] = c[u][n][2] = c[u][n][3] = 0.f;
    if (!no_arith(a)) {
#pragma unroll
      for (int u = 0; u < TPS; ++u) {
        if (t0 + u * nsm >= ntiles(OP)) break;
        const uint2* wp = reinterpret_cast<const uint2*>(w) + u * (tile_bytes(OP) / 8) + warp * S * 32 + lane;
        uint2 b[S];  // all of the warp's B fragments of the tile first: the loads overlap, then the mma chain
#pragma unroll
        for (int s = 0; s < S; ++s) b[s] = wp[s * 32];
#pragma unroll
        for (int s = 0; s < S; ++s) mma_bf16(c[u][s % NACC], xa[s], b[s]);
      }
    }
    stage_out(sh, i);
    if (no_arith(a)) continue;
#pragma unroll
    for (int u = 0; u < TPS; ++u) {
      const int t = t0 + u * nsm;
      if (g != 0 || t >= ntiles(OP)) break;
      // lane q holds rows 2q and 2q + 1 of the tile (C's columns); rows g and g + 8 of C: hi + lo
      float y0 = 0.f, y1 = 0.f;
#pragma unroll
      for (int n = 0; n < NACC; ++n) y0 += c[u][n][0] + c[u][n][2], y1 += c[u][n][1] + c[u][n][3];
      if (no_adds(a) && y0 != 0x1p100f) continue;
      if (REDUCE) {
        keep_partial(sh, l, OP, (t - sm) / nsm, 2 * q, y0), keep_partial(sh, l, OP, (t - sm) / nsm, 2 * q + 1, y1);
      } else {
        atomicAdd(out + out_index(OP, t, 2 * q), y0);
        atomicAdd(out + out_index(OP, t, 2 * q + 1), y1);
      }
    }
    if (threadIdx.x == 0) prof_add(a, 5, clock64() - c_t);
  }
  if (REDUCE) {
    store_rows<OP>(a, sh, l, rp, res);
    if (LEAN) return true;  // warp 0 released the op
  } else {  // as in consume
    if (OP == 0) zero_grid(a.gu + ((l + 1) % 2) * 2 * FF, 2 * FF);
    if (OP == 3) zero_grid(a.qkv + (l % 2) * QKV, QKV);
  }
  op_end(a, l, OP, sm);
  return true;
}
// -DWHOLE_TILES=1: one weight op of layer l, each consumer warp on whole tiles (see WHOLE_TILES). The op's input
// goes through shared memory once, as A fragments [k16 step][q][hi, lo, hi, lo] as in consume_mma; warp w takes
// this SM's tiles that sit in ring stage w.
template <int OP>
__device__ __forceinline__ bool consume_whole(const Args& a, const Shared& sh, int l, unsigned& i) {
  constexpr int K = kdim(OP) / kparts(OP), S = K / 16, NT = 32 * CONSUMER_WARPS;
  constexpr int NV4 = K / 4, VL = (NV4 + NT - 1) / NT;  // float4s of the input per thread
  static_assert(S % NACC == 0 && S * 16 <= COL_WARPS * 16 * 16, "k16 steps: a multiple of NACC, fragments fit");
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, sm = blockIdx.x, nsm = gridDim.x;
  const int g = lane / 4, q = lane % 4;
  if (!op_start(a, sh, l, OP)) return false;
  const long long c_in = clock64();
  bool bad = false;  // (TAGGED only)
  stage_input<OP, VL, CONSUMER_WARPS>(a, sh, l, OP == 4 ? sm % DOWN_KPARTS * K : 0, threadIdx.x, NT, NV4, sh.frag, bad);
  consumers_sync();
  if (threadIdx.x == 0) prof_add(a, 2, clock64() - c_in);
  float* out = OP == 0 ? a.qkv + (l % 2) * QKV : OP == 3 ? a.gu + (l % 2) * 2 * FF : a.x;
  const unsigned i0 = i;
  const int n = no_tiles(a) ? 0 : my_tiles(OP, sm);
  const uint4* fp = reinterpret_cast<const uint4*>(sh.frag) + q;
  for (int j = (warp + CONSUMER_WARPS - i0 % CONSUMER_WARPS) % CONSUMER_WARPS; j < n; j += CONSUMER_WARPS) {
    long long c_t;
    const uint4* w = stage_in(a, sh, i0 + j, c_t);  // stage (i0 + j) % STAGES == warp
    if (!w) return false;
    const uint2* wp = reinterpret_cast<const uint2*>(w) + lane;
    float c[NACC][4];
#pragma unroll
    for (int u = 0; u < NACC; ++u) c[u][0] = c[u][1] = c[u][2] = c[u][3] = 0.f;
    if (!no_arith(a)) {
#pragma unroll 2
      for (int s0 = 0; s0 < S; s0 += NACC) {
        uint2 b[NACC];
        uint4 f[NACC];
#pragma unroll
        for (int u = 0; u < NACC; ++u) b[u] = wp[(s0 + u) * 32], f[u] = fp[(s0 + u) * 4];
#pragma unroll
        for (int u = 0; u < NACC; ++u) {
          const unsigned af[4] = {f[u].x, f[u].y, f[u].z, f[u].w};
          mma_bf16(c[u], af, b[u]);
        }
      }
    }
    stage_out(sh, i0 + j);
    if (threadIdx.x == 0) prof_add(a, 5, clock64() - c_t);
    if (no_arith(a) || g != 0) continue;
    float y0 = 0.f, y1 = 0.f;  // lane q: rows 2q, 2q + 1 of the tile
#pragma unroll
    for (int u = 0; u < NACC; ++u) y0 += c[u][0] + c[u][2], y1 += c[u][1] + c[u][3];
    if (no_adds(a) && y0 != 0x1p100f) continue;
    const int t = sm + j * nsm, o = out_index(OP, t, 2 * q);
    if (OP == 4 && kparts(4) > 1) {
      atomicAdd(out + o, y0), atomicAdd(out + o + 1, y1);
    } else if (OP == 2 || OP == 4) {  // the residual: this warp owns the rows
      const float2 r = __ldcg(reinterpret_cast<const float2*>(out + o));
      *reinterpret_cast<float2*>(out + o) = make_float2(r.x + y0, r.y + y1);
    } else {
      *reinterpret_cast<float2*>(out + o) = make_float2(y0, y1);
    }
  }
  i = i0 + my_tiles(OP, sm) * !no_tiles(a);
  op_end(a, l, OP, sm);
  return true;
}

template <int OP>
__device__ __forceinline__ bool run_op(const Args& a, const Shared& sh, int l, unsigned& i) {
  if constexpr (WHOLE_TILES) return consume_whole<OP>(a, sh, l, i);
  else if constexpr (MMA) return consume_mma<OP>(a, sh, l, i);
  else return consume<OP>(a, sh, l, i);
}

// the attention stand-in: per head, the chain's latency, then q's head as the output; heads on the last SMs,
// which have the fewest weight tiles of every op
__device__ __forceinline__ bool attend(const Args& a, const Shared& sh, int l) {
  const int slot = gridDim.x - 1 - blockIdx.x;
  if (slot >= ntiles(1)) return true;
  if (!op_start(a, sh, l, 1)) return false;
  const long long c0 = clock64();
  for (int t = slot; t < ntiles(1); t += gridDim.x) {
    float qv = 0.f;
    bool bad = false;
    if (TAGGED && threadIdx.x < HD && !no_input(a)) {  // q's head t from its pairs
      const unsigned long long* p = a.tq + t * HD + threadIdx.x;
      unsigned long long u = ld_pair(p);
      const long long c_w = clock64();
      unsigned polls = 0;
      while (waits_inputs(a) && (unsigned)(u >> 32) != tag_of(a.gen, l, 0) && !bad) {
        bad = watchdog(c_w, polls, a.error);
        u = ld_pair(p);
      }
      qv = __uint_as_float((unsigned)u);
    }
    if (threadIdx.x == 0) {
      long long t0 = now_ns();
      while (now_ns() - t0 < a.attention_ns) {
      }
    }
    if (TAGGED) {
      if (consumers_any(bad)) return false;
      if (threadIdx.x < HD && !no_release(a)) st_tagged(a.tattn + t * HD + threadIdx.x, qv, tag_of(a.gen, l, 1));
    } else {
      consumers_sync();
      if (threadIdx.x < HD) a.attn[t * HD + threadIdx.x] = __ldcg(a.qkv + (l % 2) * QKV + t * HD + threadIdx.x);
    }
  }
  if (threadIdx.x == 0) prof_add(a, 7, clock64() - c0);
  op_end(a, l, 1, slot);
  return true;
}

// --- the persistent kernel --------------------------------------------------------------------------------
__global__ void __launch_bounds__(THREADS, 1) decode_token(Args a) {
  extern __shared__ __align__(128) unsigned char smem[];
  __shared__ float partial[CONSUMER_WARPS];
  __shared__ float mlp[2 * COL_WARPS * 2 * MLP_PAIRS];
  __shared__ int stop;
  __shared__ __align__(16) unsigned frag[MMA ? COL_WARPS * 16 * 16 : 4];
  __shared__ float red[REDUCE ? (1 + LEAN) * COL_WARPS * MAXR : 1];
  __shared__ __align__(8) unsigned long long full[STAGES], empty[STAGES];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, sm = blockIdx.x, nsm = gridDim.x;
  if (threadIdx.x == 0) {
    for (int s = 0; s < STAGES; ++s) {
      mbar_init(smem_addr(&full[s]), 1);
      mbar_init(smem_addr(&empty[s]), WHOLE_TILES ? 1 : CONSUMER_WARPS);
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
  }
  __syncthreads();

  if (warp == CONSUMER_WARPS) {  // the producer: stream this CTA's weight tiles, in the consumers' order
    if (lane != 0 || no_tiles(a)) return;
    unsigned i = 0;
    for (int l = 0; l < LAYERS; ++l)
      for (int op = 0; op < OPS; ++op) {
        if (kdim(op) == 0) continue;
        if (a.gated == 1 && sm < ntiles(op) && !wait_done(a, op == 0 ? l - 1 : l, op == 0 ? LAST_OP : op - 1)) return;
        for (int t = sm; t < ntiles(op); t += nsm * TPS, ++i) {  // a stage: this SM's next TPS tiles of the op
          const unsigned s = i % STAGES, round = i / STAGES;
          const long long c0 = clock64();
          if (round > 0 && !mbar_wait(smem_addr(&empty[s]), (round - 1) & 1, a.error)) return;
          prof_add(a, 4, clock64() - c0);
          if (a.gated >= 6) {  // diagnostics: no weights read; the stage's old bytes count as its tiles'
            mbar_arrive(smem_addr(&full[s]));
            continue;
          }
          const int n = min(TPS, (ntiles(op) - t + nsm - 1) / nsm);
          mbar_expect_tx(smem_addr(&full[s]), n * tile_bytes(op));
          for (int u = 0; u < n; ++u)
            bulk_copy(smem_addr(smem + s * STAGE_BYTES + u * tile_bytes(op)), tile_src(a, l, op, t + u * nsm),
                      tile_bytes(op), smem_addr(&full[s]));
        }
      }
    return;
  }

  const Shared sh{smem, full, empty, partial, mlp, &stop, frag, red};

  const long long c0 = clock64(), t0 = now_ns();
  unsigned i = 0;  // weight tiles consumed
  for (int l = 0; l < LAYERS; ++l)
    if (!run_op<0>(a, sh, l, i) || !attend(a, sh, l) || !run_op<2>(a, sh, l, i) || !run_op<3>(a, sh, l, i) ||
        (!FUSED_MLP && !run_op<4>(a, sh, l, i)))
      return;
  if (threadIdx.x == 0) prof_add(a, 0, clock64() - c0), prof_add(a, 8, now_ns() - t0);
}

// --- the reference: one plain launch per op --------------------------------------------------------------
__global__ void ref_rms(const float* x, float* out) {
  __shared__ float red[1024];
  float ss = 0.f;
  for (int k = threadIdx.x; k < D; k += blockDim.x) ss += x[k] * x[k];
  red[threadIdx.x] = ss;
  __syncthreads();
  if (threadIdx.x == 0) {
    float t = 0.f;
    for (int j = 0; j < blockDim.x; ++j) t += red[j];
    *out = rsqrtf(t / D + 1e-5f);
  }
}
// y[r] = sum_k W[wrow(r)][k] v[k] (scaled), with the op's epilogue; one thread per output row
__global__ void ref_op(int op, const __nv_bfloat16* W, const float* v, const float* inv, float* out, float* x) {
  const int r = blockIdx.x * blockDim.x + threadIdx.x;
  if (r >= nout(op)) return;
  const int K = kdim(op);
  auto dot = [&](long long wrow) {
    float acc = 0.f;
    for (int k = 0; k < K; ++k) acc += __bfloat162float(W[wrow * K + k]) * v[k];
    return acc;
  };
  if (op == 3) {
    const int t = r / GU_PAIRS, j = r % GU_PAIRS;
    const float g = dot((long long)t * 2 * GU_PAIRS + j) * *inv, u = dot((long long)t * 2 * GU_PAIRS + GU_PAIRS + j) * *inv;
    out[r] = g / (1.f + expf(-g)) * u;
  } else if (op == 0) {
    out[r] = dot(r) * *inv;
  } else {
    x[r] += dot(r);
  }
}

// the fused layout: tile t holds MLP_PAIRS gate rows, the same up rows, then the same columns of down as rows
__global__ void ref_mlp_h(const __nv_bfloat16* W, const float* x, const float* inv, float* h) {
  const int f = blockIdx.x * blockDim.x + threadIdx.x;
  if (f >= FF) return;
  const long long base = (long long)(f / MLP_PAIRS) * 3 * MLP_PAIRS + f % MLP_PAIRS;
  float g = 0.f, u = 0.f;
  for (int k = 0; k < D; ++k) {
    g += __bfloat162float(W[base * D + k]) * x[k];
    u += __bfloat162float(W[(base + MLP_PAIRS) * D + k]) * x[k];
  }
  g *= *inv, u *= *inv;
  h[f] = g / (1.f + expf(-g)) * u;
}
__global__ void ref_mlp_down(const __nv_bfloat16* W, const float* h, float* x) {
  const int d = blockIdx.x * blockDim.x + threadIdx.x;
  if (d >= D) return;
  float acc = 0.f;
  for (int f = 0; f < FF; ++f)
    acc += __bfloat162float(W[((long long)(f / MLP_PAIRS) * 3 * MLP_PAIRS + 2 * MLP_PAIRS + f % MLP_PAIRS) * D + d]) * h[f];
  x[d] += acc;
}

// the MMA builds' weights: tile t of an op (8 rows, one column part) as k16 steps of 32 lanes x 4 bf16, each lane's
// B fragment (row lane / 4 of the tile; columns 2q, 2q + 1, 2q + 8, 2q + 9 of the step, q = lane % 4)
__global__ void pack_mma(const __nv_bfloat16* w, int K, int parts, size_t n, __nv_bfloat16* out) {
  const int Kp = K / parts;
  const size_t tile = 8 * (size_t)Kp;
  for (size_t e = blockIdx.x * (size_t)blockDim.x + threadIdx.x; e < n; e += (size_t)gridDim.x * blockDim.x) {
    const size_t t = e / tile;
    const int r = e % tile, kk = r / 128, lane = r % 128 / 4, j = r % 4;
    const size_t row = t / parts * 8 + lane / 4;
    const int col = t % parts * Kp + kk * 16 + 2 * (lane % 4) + (j & 1) + (j >> 1) * 8;
    out[e] = w[row * K + col];
  }
}

__global__ void read_stream(const uint4* p, size_t n, unsigned long long* sink) {
  uint4 acc = {0, 0, 0, 0};
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    uint4 v = __ldcs(p + i);
    acc.x ^= v.x, acc.y ^= v.y, acc.z ^= v.z, acc.w ^= v.w;
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) atomicAdd(sink, 1ull);
}

__global__ void fill(__nv_bfloat16* w, size_t n, unsigned seed, float scale) {
  for (size_t i = blockIdx.x * (size_t)blockDim.x + threadIdx.x; i < n; i += (size_t)gridDim.x * blockDim.x) {
    unsigned h = (unsigned)i * 2654435761u ^ seed;
    h ^= h >> 13, h *= 0x5bd1e995u, h ^= h >> 15;
    w[i] = __float2bfloat16(((h & 0xffff) / 32768.f - 1.f) * scale);
  }
}

int main(int argc, char** argv) {
  std::vector<long long> waits = {0, 2000, 4500};  // the attention stand-in's spins, ns
  if (argc > 1) waits.clear();
  for (int j = 1; j < argc; ++j) {
    char* end = nullptr;
    const long long ns = strtoll(argv[j], &end, 10);
    if (!*argv[j] || *end || ns < 0 || ns > 1000000) {
      fprintf(stderr, "attention stand-in '%s': give whole nanoseconds from 0 to 1000000, e.g. %s 0 2000 4500\n",
              argv[j], argv[0]);
      return 2;
    }
    waits.push_back(ns);
  }
  int dev = 0, nsm = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&nsm, cudaDevAttrMultiProcessorCount, dev));
  cudaDeviceProp prop;
  CHECK(cudaGetDeviceProperties(&prop, dev));
  if (prop.major != 9) {  // cp.async.bulk, mbarrier tx counts: built for sm_90a
    fprintf(stderr, "%s is sm_%d%d; this prototype needs a Hopper GPU (sm_90: H100 / H200)\n", prop.name, prop.major,
            prop.minor);
    return 1;
  }
  const size_t per_layer[OPS] = {(size_t)QKV * D, 0, (size_t)D * D, (size_t)(FUSED_MLP ? 3 : 2) * FF * D,
                                 FUSED_MLP ? 0 : (size_t)D * FF};
  size_t total = 0;
  for (int op = 0; op < OPS; ++op) total += per_layer[op];
  total *= LAYERS;
  __nv_bfloat16* wbuf;
  CHECK(cudaMalloc(&wbuf, total * 2));
  fill<<<1024, 256>>>(wbuf, total, 7u, 1.f / sqrtf((float)D));
  if (MMA && nsm % DOWN_KPARTS) {
    fprintf(stderr, "MMA builds give each SM one of DOWN_KPARTS=%d parts of h: %d SMs is not a multiple; build with "
            "-DDOWN_KPARTS=%d\n", DOWN_KPARTS, nsm, nsm % 2 ? 1 : 2);
    return 1;
  }
  for (int op = 0; op < OPS; ++op)
    if (REDUCE && kdim(op) && (ntiles(op) + nsm - 1) / nsm * tile_rows_in_w(op) > MAXR) {
      fprintf(stderr, "REDUCE keeps %d rows per SM and op; op %d needs %d on %d SMs: raise MAXR\n", MAXR, op,
              (ntiles(op) + nsm - 1) / nsm * tile_rows_in_w(op), nsm);
      return 1;
    }
  // the kernel reads `a` (packed for the MMA builds), the reference the plain row-major copy
  __nv_bfloat16* pbuf = wbuf;
  if (MMA) CHECK(cudaMalloc(&pbuf, total * 2));
  Args a{};
  Weights ref[LAYERS];
  size_t off = 0;
  for (int l = 0; l < LAYERS; ++l)
    for (int op = 0; op < OPS; ++op) {
      ref[l].w[op] = wbuf + off;
      a.layer[l].w[op] = pbuf + off;
      if (MMA && per_layer[op])
        pack_mma<<<1024, 256>>>(wbuf + off, kdim(op), kparts(op), per_layer[op], pbuf + off);
      off += per_layer[op];
    }
  CHECK(cudaDeviceSynchronize());
  float *x, *x0, *qkv, *attn, *h, *inv, *kqkv, *gu;
  CHECK(cudaMalloc(&x, D * 4));
  CHECK(cudaMalloc(&x0, D * 4));
  CHECK(cudaMalloc(&qkv, QKV * 4));
  CHECK(cudaMalloc(&attn, D * 4));
  CHECK(cudaMalloc(&h, FF * 4));
  CHECK(cudaMalloc(&kqkv, 2 * QKV * 4));  // the kernel's buffers start zeroed; it leaves them so
  CHECK(cudaMemset(kqkv, 0, 2 * QKV * 4));
  CHECK(cudaMalloc(&gu, 4 * FF * 4));
  CHECK(cudaMemset(gu, 0, 4 * FF * 4));
  CHECK(cudaMalloc(&inv, 4));
  std::vector<float> hx(D);
  for (int k = 0; k < D; ++k) hx[k] = sinf(0.37f * k) + 0.1f;
  CHECK(cudaMemcpy(x0, hx.data(), D * 4, cudaMemcpyHostToDevice));
  unsigned* counters;
  int* error;
  CHECK(cudaMalloc(&counters, LAYERS * OPS * 4));
  CHECK(cudaMemset(counters, 0, LAYERS * OPS * 4));
  unsigned* reads;
  CHECK(cudaMalloc(&reads, LAYERS * 4));
  CHECK(cudaMemset(reads, 0, LAYERS * 4));
  CHECK(cudaMalloc(&error, 4));
  CHECK(cudaMemset(error, 0, 4));
  a.x = x, a.qkv = kqkv, a.attn = attn, a.gu = gu, a.counters = counters, a.reads = reads, a.error = error;
  unsigned long long* pairs = nullptr;  // TAGGED: the pair buffers, zero (no tag) to start with
  const size_t npairs = QKV + D + D + 2 * FF + DOWN_KPARTS * D;
  if (TAGGED) {
    CHECK(cudaMalloc(&pairs, npairs * 8));
    CHECK(cudaMemset(pairs, 0, npairs * 8));
    a.tq = pairs, a.tattn = a.tq + QKV, a.txo = a.tattn + D, a.tgu = a.txo + D, a.tdp = a.tgu + 2 * FF;
  }
  const int smem = STAGES * STAGE_BYTES;
  CHECK(cudaFuncSetAttribute(decode_token, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  int per_sm = 0;
  CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, decode_token, THREADS, smem));
  if (per_sm < 1) {
    fprintf(stderr, "the kernel does not fit on an SM\n");
    return 1;
  }
  unsigned gen = 0;
  auto launch = [&](long long attention_ns, int gated) {
    a.gen = gated >= 9 ? gen : ++gen;  // modes without releases leave the counters as they were
    a.attention_ns = attention_ns, a.gated = gated;
    void* params[] = {&a};
    CHECK(cudaLaunchCooperativeKernel((void*)decode_token, nsm, THREADS, params, smem, 0));
  };
  auto failed = [&]() {
    int e = 0;
    CHECK(cudaMemcpy(&e, error, 4, cudaMemcpyDeviceToHost));
    return e != 0;
  };

  // correctness: one token through the kernel and through the reference, from the same x
  CHECK(cudaMemcpy(x, x0, D * 4, cudaMemcpyDeviceToDevice));
  launch(0, 0);
  CHECK(cudaDeviceSynchronize());
  if (failed()) {
    fprintf(stderr, "a wait timed out (watchdog)\n");
    return 2;
  }
  std::vector<float> got(D), want(D);
  CHECK(cudaMemcpy(got.data(), x, D * 4, cudaMemcpyDeviceToHost));
  if (TAGGED) {  // the last layer's x + o plus its down parts, every pair carrying its tag
    std::vector<unsigned long long> hp(npairs);
    CHECK(cudaMemcpy(hp.data(), pairs, npairs * 8, cudaMemcpyDeviceToHost));
    const size_t xo = QKV + D, dp = QKV + 2 * D + 2 * FF;
    const unsigned gen1 = 128u + (LAYERS - 1) * OPS;  // tag_of(1, LAYERS - 1, op) - op
    int untagged = 0;
    for (int k = 0; k < D; ++k) {
      float v;
      unsigned bits = (unsigned)hp[xo + k];
      memcpy(&v, &bits, 4);
      untagged += (unsigned)(hp[xo + k] >> 32) != gen1 + 2;
      for (int p = 0; p < DOWN_KPARTS; ++p) {
        float d;
        bits = (unsigned)hp[dp + p * D + k];
        memcpy(&d, &bits, 4);
        v += d;
        untagged += (unsigned)(hp[dp + p * D + k] >> 32) != gen1 + 4;
      }
      got[k] = v;
    }
    if (untagged) {
      fprintf(stderr, "%d output pairs without the last layer's tag\n", untagged);
      return 3;
    }
  }
  CHECK(cudaMemcpy(x, x0, D * 4, cudaMemcpyDeviceToDevice));
  for (int l = 0; l < LAYERS; ++l) {
    ref_rms<<<1, 1024>>>(x, inv);
    ref_op<<<(QKV + 255) / 256, 256>>>(0, ref[l].w[0], x, inv, qkv, x);
    CHECK(cudaMemcpy(attn, qkv, D * 4, cudaMemcpyDeviceToDevice));
    ref_op<<<(D + 255) / 256, 256>>>(2, ref[l].w[2], attn, inv, nullptr, x);
    ref_rms<<<1, 1024>>>(x, inv);
    if (FUSED_MLP) {
      ref_mlp_h<<<(FF + 255) / 256, 256>>>(ref[l].w[3], x, inv, h);
      ref_mlp_down<<<(D + 255) / 256, 256>>>(ref[l].w[3], h, x);
    } else {
      ref_op<<<(FF + 255) / 256, 256>>>(3, ref[l].w[3], x, inv, h, x);
      ref_op<<<(D + 255) / 256, 256>>>(4, ref[l].w[4], h, inv, nullptr, x);
    }
  }
  CHECK(cudaMemcpy(want.data(), x, D * 4, cudaMemcpyDeviceToHost));
  double err = 0, scale = 0;
  for (int k = 0; k < D; ++k) err = fmax(err, fabs(got[k] - want[k])), scale = fmax(scale, fabs(want[k]));
  printf("build: TAGGED=%d WHOLE_TILES=%d REDUCE=%d MMA=%d (%d tiles per stage, %d accumulators) ring %d x %d KB, rows per tile q/k/v %d o %d gate/up pairs %d down %d (x%d parts)%s\n", TAGGED, WHOLE_TILES, REDUCE, MMA, TPS, NACC,
         RING_STAGES, STAGE_KB, ROWS_QKV, ROWS_O, GU_PAIRS, ROWS_DOWN, kparts(4), FUSED_MLP ? ", fused MLP" : "");
  printf("%s, %d SMs; weights %.3f GB; max |kernel - reference| = %.3g (max |x| %.3g)\n", prop.name, nsm,
         total * 2 / 1e9, err, scale);
  if (!(err <= 2e-3 * scale)) {
    fprintf(stderr, "MISMATCH\n");
    return 3;
  }

  // timing: the read stream over the same bytes, then the kernel at each attention stand-in
  cudaEvent_t e0, e1;
  CHECK(cudaEventCreate(&e0));
  CHECK(cudaEventCreate(&e1));
  unsigned long long* sink;
  CHECK(cudaMalloc(&sink, 8));
  const int reps = 30;
  float ms = 0;
  read_stream<<<nsm * 8, 512>>>((const uint4*)wbuf, total * 2 / 16, sink);
  CHECK(cudaEventRecord(e0));
  for (int r = 0; r < reps; ++r) read_stream<<<nsm * 8, 512>>>((const uint4*)wbuf, total * 2 / 16, sink);
  CHECK(cudaEventRecord(e1));
  CHECK(cudaEventSynchronize(e1));
  CHECK(cudaEventElapsedTime(&ms, e0, e1));
  const double stream_us = ms * 1e3 / reps, bw = total * 2 / (stream_us * 1e-6);
  printf("read stream: %.1f us per pass = %.2f TB/s\n", stream_us, bw / 1e12);
  printf("%-14s %-34s %10s %10s %12s\n", "attention ns", "weights streamed", "us/token", "tok/s", "% of stream");
  const char* modes[11] = {"ahead (ring " STR(RING_STAGES) " x " STR(STAGE_KB) " KB)", "after each op's inputs are ready",
                         "diag: no input waits", "diag: + no input vector", "diag: + no arithmetic", "diag: dependency chain only",
                         "diag: consumers alone (no DRAM)", "diag: + no partial-sum adds", "diag: + no arithmetic (hand-offs)",
                         "diag: + no releases", "diag: + no tiles (op barriers)"};
  // a profiled launch: per SM, clock cycles in each wait and role (thread 0 of the consumers; the producer's lane)
  unsigned long long* prof;
  CHECK(cudaMalloc(&prof, nsm * NPROF * 8));
  auto profile = [&](long long ns, int gated) {
    CHECK(cudaMemset(prof, 0, nsm * NPROF * 8));
    a.prof = prof;
    launch(ns, gated);
    CHECK(cudaDeviceSynchronize());
    a.prof = nullptr;
    std::vector<unsigned long long> h(nsm * NPROF);
    CHECK(cudaMemcpy(h.data(), prof, h.size() * 8, cudaMemcpyDeviceToHost));
    std::vector<double> mean(NPROF, 0), mx(NPROF, 0);
    for (int m = 0; m < nsm; ++m)
      for (int f = 0; f < NPROF; ++f) mean[f] += h[m * NPROF + f] / (double)nsm, mx[f] = fmax(mx[f], h[m * NPROF + f]);
    const double us_per_cycle = mean[8] / mean[0] / 1e3;  // from the kernel's own clock and timer
    char line[1024];
    int n = snprintf(line, sizeof line, "profile at attention %lld ns (us per token, mean / max over SMs):", ns);
    for (int f = 0; f < NPROF - 1; ++f)
      n += snprintf(line + n, sizeof line - n, "\n    %-24s %7.1f / %7.1f", PROF_NAMES[f], mean[f] * us_per_cycle,
                    mx[f] * us_per_cycle);
    return std::string(line);
  };
  std::vector<std::string> profiles;
  for (long long ns : waits)
    for (int gated = 0; gated < 11; ++gated) {
      if (TAGGED && gated == 1) {  // the producer's gate polls the counters, which TAGGED builds do not keep
        printf("%-14lld %-34s %10s\n", ns, modes[gated], "n/a");
        continue;
      }
      launch(ns, gated);
      CHECK(cudaEventRecord(e0));
      for (int r = 0; r < reps; ++r) launch(ns, gated);
      CHECK(cudaEventRecord(e1));
      CHECK(cudaEventSynchronize(e1));
      if (failed()) {
        fprintf(stderr, "a wait timed out (watchdog)\n");
        return 2;
      }
      CHECK(cudaEventElapsedTime(&ms, e0, e1));
      const double us = ms * 1e3 / reps;
      printf("%-14lld %-34s %10.1f %10.0f %11.1f%%\n", ns, modes[gated],
             us, 1e6 / us, 100.0 * stream_us / us);
      if (gated == 0) profiles.push_back(profile(ns, gated));
    }
  for (auto& p : profiles) printf("%s\n", p.c_str());
  return 0;
}
