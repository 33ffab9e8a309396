// CUDA kernels of padfree::moe_align (see moe_align.cpp for the contract). Four small launches,
// no host sync, deterministic (a stable counting sort; no atomics decide any position):
//   1. count:       per chunk of kChunk pairs, a histogram of experts (shared-memory counters).
//   2. chunk_scan:  one block per expert scans its counts over the chunks -> where each chunk's
//                   pairs of that expert start within the expert's run; totals[e].
//   3. offsets:     one block scans the block-padded totals over experts -> padded_offsets, writes
//                   block_expert (binary search) and fills sorted_pairs with the sentinel.
//   4. place:       per chunk, each pair's rank among the chunk's pairs of its expert (warp
//                   __match_any_sync + per-warp counts in shared memory) gives its position.
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

constexpr int kChunk = 256;           // pairs per chunk = threads per block of count / place
constexpr int kWarps = kChunk / 32;
constexpr int kScanThreads = 256;
constexpr int kOffsetThreads = 1024;

template <typename Index>
__device__ __forceinline__ int expert_of(const Index* experts, int64_t p, int64_t num_pairs, int num_experts) {
  if (p >= num_pairs) return -1;
  const int64_t e = static_cast<int64_t>(experts[p]);
  return (e >= 0 && e < num_experts) ? static_cast<int>(e) : -1;
}

template <typename Index>
__global__ void __launch_bounds__(kChunk)
moe_align_count_kernel(const Index* __restrict__ experts, int64_t num_pairs, int num_experts,
                       int32_t* __restrict__ chunk_counts) {
  extern __shared__ int counts[];
  for (int e = threadIdx.x; e < num_experts; e += kChunk) counts[e] = 0;
  __syncthreads();
  const int e = expert_of(experts, static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x, num_pairs, num_experts);
  if (e >= 0) atomicAdd(&counts[e], 1);  // a sum: the same whatever the order
  __syncthreads();
  for (int x = threadIdx.x; x < num_experts; x += kChunk) {
    chunk_counts[static_cast<int64_t>(blockIdx.x) * num_experts + x] = counts[x];
  }
}

__global__ void __launch_bounds__(kScanThreads)
moe_align_chunk_scan_kernel(int32_t* __restrict__ chunk_counts, int64_t num_chunks, int num_experts,
                            int32_t* __restrict__ totals) {
  using Scan = cub::BlockScan<int, kScanThreads>;
  __shared__ typename Scan::TempStorage storage;
  const int e = blockIdx.x;
  int carried = 0;
  for (int64_t base = 0; base < num_chunks; base += kScanThreads) {
    const int64_t chunk = base + threadIdx.x;
    const int64_t at = chunk * num_experts + e;
    const int count = chunk < num_chunks ? chunk_counts[at] : 0;
    int before = 0;
    int total = 0;
    Scan(storage).ExclusiveSum(count, before, total);
    if (chunk < num_chunks) chunk_counts[at] = carried + before;
    carried += total;
    __syncthreads();  // storage is reused by the next round
  }
  if (threadIdx.x == 0) totals[e] = carried;
}

__global__ void __launch_bounds__(kOffsetThreads)
moe_align_offsets_kernel(const int32_t* __restrict__ totals, int num_experts, int block_size, int64_t capacity,
                         int64_t num_blocks, int32_t sentinel, int32_t* __restrict__ padded_offsets,
                         int32_t* __restrict__ block_expert, int32_t* __restrict__ sorted_pairs) {
  using Scan = cub::BlockScan<int, kOffsetThreads>;
  __shared__ typename Scan::TempStorage storage;
  int carried = 0;
  for (int base = 0; base < num_experts; base += kOffsetThreads) {
    const int e = base + threadIdx.x;
    const int padded = e < num_experts ? (totals[e] + block_size - 1) / block_size * block_size : 0;
    int before = 0;
    int total = 0;
    Scan(storage).ExclusiveSum(padded, before, total);
    if (e < num_experts) padded_offsets[e] = carried + before;
    carried += total;
    __syncthreads();
  }
  if (threadIdx.x == 0) padded_offsets[num_experts] = carried;
  __syncthreads();  // padded_offsets (global) is visible to the whole block after this barrier
  for (int64_t b = threadIdx.x; b < num_blocks; b += kOffsetThreads) {
    const int64_t start = b * block_size;
    int expert = -1;
    if (start < carried) {
      int low = 0;
      int high = num_experts - 1;  // last e with padded_offsets[e] <= start
      while (low < high) {
        const int mid = (low + high + 1) / 2;
        if (padded_offsets[mid] <= start) low = mid; else high = mid - 1;
      }
      expert = low;
    }
    block_expert[b] = expert;
  }
  for (int64_t i = threadIdx.x; i < capacity; i += kOffsetThreads) sorted_pairs[i] = sentinel;
}

template <typename Index>
__global__ void __launch_bounds__(kChunk)
moe_align_place_kernel(const Index* __restrict__ experts, int64_t num_pairs, int num_experts,
                       const int32_t* __restrict__ chunk_base, const int32_t* __restrict__ padded_offsets,
                       int32_t* __restrict__ sorted_pairs, int32_t* __restrict__ pair_position) {
  extern __shared__ int warp_counts[];  // (kWarps, num_experts)
  for (int i = threadIdx.x; i < kWarps * num_experts; i += kChunk) warp_counts[i] = 0;
  __syncthreads();
  const int64_t p = static_cast<int64_t>(blockIdx.x) * kChunk + threadIdx.x;
  const int e = expert_of(experts, p, num_pairs, num_experts);
  const int lane = threadIdx.x % 32;
  const int warp = threadIdx.x / 32;
  const unsigned peers = __match_any_sync(0xffffffffu, e);
  const int rank_in_warp = __popc(peers & ((1u << lane) - 1u));
  if (e >= 0 && lane == __ffs(peers) - 1) warp_counts[warp * num_experts + e] = __popc(peers);
  __syncthreads();
  if (p >= num_pairs) return;
  if (e < 0) {
    pair_position[p] = 0;
    return;
  }
  int rank = rank_in_warp;
  for (int w = 0; w < warp; ++w) rank += warp_counts[w * num_experts + e];
  const int position = padded_offsets[e] + chunk_base[static_cast<int64_t>(blockIdx.x) * num_experts + e] + rank;
  sorted_pairs[position] = static_cast<int32_t>(p);
  pair_position[p] = position;
}

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("moe_align: ") + what + " launch failed: " + cudaGetErrorString(err));
  }
}

template <typename Index>
void launch_chunked(const Index* experts, int64_t num_pairs, int num_experts, int64_t num_chunks,
                    int32_t* chunk_counts, const int32_t* padded_offsets, int32_t* sorted_pairs,
                    int32_t* pair_position, cudaStream_t stream, bool place) {
  if (num_chunks == 0) return;
  if (!place) {
    moe_align_count_kernel<Index><<<num_chunks, kChunk, num_experts * sizeof(int), stream>>>(
        experts, num_pairs, num_experts, chunk_counts);
    check_launch("count");
  } else {
    moe_align_place_kernel<Index><<<num_chunks, kChunk, kWarps * num_experts * sizeof(int), stream>>>(
        experts, num_pairs, num_experts, chunk_counts, padded_offsets, sorted_pairs, pair_position);
    check_launch("place");
  }
}

}  // namespace

int64_t padfree_moe_align_chunk_size() { return kChunk; }

void padfree_launch_moe_align(const void* experts, bool experts_are_int64, int64_t num_pairs, int64_t num_experts,
                              int64_t block_size, int32_t* chunk_counts, int32_t* totals, int32_t* sorted_pairs,
                              int32_t* block_expert, int32_t* padded_offsets, int32_t* pair_position, void* stream) {
  const auto cuda_stream = static_cast<cudaStream_t>(stream);
  const int experts_count = static_cast<int>(num_experts);
  const int64_t num_chunks = (num_pairs + kChunk - 1) / kChunk;
  const int64_t num_blocks = (num_pairs + num_experts * (block_size - 1) + block_size - 1) / block_size;
  const int64_t capacity = num_blocks * block_size;
  const auto run = [&](bool place) {
    if (experts_are_int64) {
      launch_chunked(static_cast<const int64_t*>(experts), num_pairs, experts_count, num_chunks, chunk_counts,
                     padded_offsets, sorted_pairs, pair_position, cuda_stream, place);
    } else {
      launch_chunked(static_cast<const int32_t*>(experts), num_pairs, experts_count, num_chunks, chunk_counts,
                     padded_offsets, sorted_pairs, pair_position, cuda_stream, place);
    }
  };
  run(false);
  moe_align_chunk_scan_kernel<<<experts_count, kScanThreads, 0, cuda_stream>>>(chunk_counts, num_chunks,
                                                                               experts_count, totals);
  check_launch("chunk_scan");
  moe_align_offsets_kernel<<<1, kOffsetThreads, 0, cuda_stream>>>(
      totals, experts_count, static_cast<int>(block_size), capacity, num_blocks, static_cast<int32_t>(num_pairs),
      padded_offsets, block_expert, sorted_pairs);
  check_launch("offsets");
  run(true);
}
