// CUDA kernel of padfree::cu_seqlens_from_position_ids (see seqlens.cpp for the contract).
// One block of 1024 threads walks the tokens in chunks: a block-wide scan of the "sequence starts
// here" flags gives each start its index in cu_seqlens. Packed batches are at most a few hundred
// thousand tokens, so one block finishes in microseconds and needs no second pass or host sync.
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace {

constexpr int kThreads = 1024;

__device__ __forceinline__ bool starts_sequence(const int64_t* pos, int64_t i, int64_t row_length) {
  return i % row_length == 0 || pos[i] != pos[i - 1] + 1;
}

__global__ void __launch_bounds__(kThreads)
cu_seqlens_from_position_ids_kernel(const int64_t* __restrict__ pos, int64_t numel, int64_t row_length,
                                    int32_t* __restrict__ cu_seqlens, int32_t* __restrict__ max_seqlen) {
  using Scan = cub::BlockScan<int, kThreads>;
  using Reduce = cub::BlockReduce<int, kThreads>;
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ typename Reduce::TempStorage reduce_storage;
  __shared__ int carried;
  if (threadIdx.x == 0) carried = 0;
  __syncthreads();

  for (int64_t base = 0; base < numel; base += kThreads) {
    const int64_t i = base + threadIdx.x;
    const int flag = (i < numel && starts_sequence(pos, i, row_length)) ? 1 : 0;
    int before = 0;
    int chunk_total = 0;
    Scan(scan_storage).ExclusiveSum(flag, before, chunk_total);
    if (flag) cu_seqlens[carried + before] = static_cast<int32_t>(i);
    __syncthreads();
    if (threadIdx.x == 0) carried += chunk_total;
    __syncthreads();
  }
  const int num_sequences = carried;
  for (int64_t j = num_sequences + threadIdx.x; j <= numel; j += kThreads) {
    cu_seqlens[j] = static_cast<int32_t>(numel);
  }
  __syncthreads();  // global writes above are visible to the whole block after this barrier

  int longest = 0;
  for (int j = threadIdx.x; j < num_sequences; j += kThreads) {
    longest = max(longest, cu_seqlens[j + 1] - cu_seqlens[j]);
  }
  const int block_longest = Reduce(reduce_storage).Reduce(longest, [](int a, int b) { return max(a, b); });
  if (threadIdx.x == 0) *max_seqlen = block_longest;
}

}  // namespace

void padfree_launch_cu_seqlens_from_position_ids(const int64_t* position_ids, int64_t numel,
                                                 int64_t row_length, int32_t* cu_seqlens,
                                                 int32_t* max_seqlen, void* stream) {
  cu_seqlens_from_position_ids_kernel<<<1, kThreads, 0, static_cast<cudaStream_t>(stream)>>>(
      position_ids, numel, row_length, cu_seqlens, max_seqlen);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("cu_seqlens_from_position_ids kernel launch failed: ") +
                             cudaGetErrorString(err));
  }
}
