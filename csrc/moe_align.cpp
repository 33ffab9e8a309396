// padfree::moe_align: sort the (token, choice) pairs of an MoE layer by expert into the
// block-padded list that padfree's grouped GEMMs walk, with no device->host copy.
//
//   moe_align(Tensor top_k_index, int num_experts, int block_size)
//     -> (sorted_pairs, block_expert, padded_offsets, pair_position), all int32
//
// Pair p = t * k + j is token t's j-th choice (top_k_index flattened). With P = N * k pairs:
//   sorted_pairs (P + E * (block_size - 1) rounded up to a multiple of block_size,): pair ids grouped by expert in increasing pair order
//       (a stable sort), each expert's run padded to a multiple of block_size with the sentinel P;
//       the tail past the last run is P too. Its length is the upper bound of the padded total,
//       so it is sized on the host without knowing the per-expert counts.
//   block_expert (len(sorted_pairs) / block_size,): expert of each block, -1 past the end.
//   padded_offsets (E + 1,): start of each expert's run in sorted_pairs.
//   pair_position (P,): where each pair landed in sorted_pairs.
// Expert ids outside 0..E-1 are rejected on the CPU; the CUDA kernel cannot check them without a
// host sync, so it drops such pairs (pair_position 0), and padfree.moe_experts validates first.
#include <torch/all.h>

#include <algorithm>
#include <cstdint>
#include <vector>

#ifdef PADFREE_WITH_CUDA
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
// Defined in moe_align_cuda.cu; `stream` is a cudaStream_t. `experts` is int32 or int64 per
// `experts_are_int64`; `chunk_counts` (num_chunks * E) and `totals` (E) are scratch.
int64_t padfree_moe_align_chunk_size();
void padfree_launch_moe_align(const void* experts, bool experts_are_int64, int64_t num_pairs, int64_t num_experts,
                              int64_t block_size, int32_t* chunk_counts, int32_t* totals, int32_t* sorted_pairs,
                              int32_t* block_expert, int32_t* padded_offsets, int32_t* pair_position, void* stream);
#endif

namespace {

constexpr int64_t kMaxCudaExperts = 1024;

struct AlignSizes {
  int64_t num_pairs;
  int64_t capacity;
  int64_t num_blocks;
};

AlignSizes check_and_size(const at::Tensor& top_k_index, int64_t num_experts, int64_t block_size) {
  TORCH_CHECK(top_k_index.scalar_type() == at::kLong || top_k_index.scalar_type() == at::kInt,
              "moe_align: top_k_index must be int32 or int64, got ", top_k_index.scalar_type());
  TORCH_CHECK(num_experts >= 1, "moe_align: num_experts must be >= 1, got ", num_experts);
  TORCH_CHECK(block_size >= 1, "moe_align: block_size must be >= 1, got ", block_size);
  const int64_t num_pairs = top_k_index.numel();
  const int64_t num_blocks = (num_pairs + num_experts * (block_size - 1) + block_size - 1) / block_size;
  const int64_t capacity = num_blocks * block_size;
  TORCH_CHECK(capacity < (int64_t{1} << 31) - 1, "moe_align: ", capacity, " padded pairs do not fit int32");
  return {num_pairs, capacity, num_blocks};
}

template <typename Index>
void align_cpu(const Index* experts, const AlignSizes& sizes, int64_t num_experts, int64_t block_size,
               int32_t* sorted_pairs, int32_t* block_expert, int32_t* padded_offsets, int32_t* pair_position) {
  std::vector<int64_t> counts(num_experts, 0);
  for (int64_t p = 0; p < sizes.num_pairs; ++p) {
    const int64_t e = static_cast<int64_t>(experts[p]);
    TORCH_CHECK(e >= 0 && e < num_experts, "moe_align: top_k_index holds expert ", e, ", outside 0..",
                num_experts - 1);
    ++counts[e];
  }
  std::vector<int64_t> cursor(num_experts);
  padded_offsets[0] = 0;
  for (int64_t e = 0; e < num_experts; ++e) {
    cursor[e] = padded_offsets[e];
    const int64_t padded = (counts[e] + block_size - 1) / block_size * block_size;
    padded_offsets[e + 1] = static_cast<int32_t>(padded_offsets[e] + padded);
  }
  for (int64_t i = 0; i < sizes.capacity; ++i) sorted_pairs[i] = static_cast<int32_t>(sizes.num_pairs);
  for (int64_t p = 0; p < sizes.num_pairs; ++p) {
    const int64_t position = cursor[static_cast<int64_t>(experts[p])]++;
    sorted_pairs[position] = static_cast<int32_t>(p);
    pair_position[p] = static_cast<int32_t>(position);
  }
  for (int64_t b = 0; b < sizes.num_blocks; ++b) block_expert[b] = -1;
  for (int64_t e = 0; e < num_experts; ++e) {
    for (int64_t b = padded_offsets[e] / block_size; b < padded_offsets[e + 1] / block_size; ++b) {
      block_expert[b] = static_cast<int32_t>(e);
    }
  }
}

using AlignResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

AlignResult allocate(const at::Tensor& like, const AlignSizes& sizes, int64_t num_experts) {
  const auto options = like.options().dtype(at::kInt);
  return {at::empty({sizes.capacity}, options), at::empty({sizes.num_blocks}, options),
          at::empty({num_experts + 1}, options), at::empty({sizes.num_pairs}, options)};
}

AlignResult moe_align_cpu(const at::Tensor& top_k_index, int64_t num_experts, int64_t block_size) {
  const AlignSizes sizes = check_and_size(top_k_index, num_experts, block_size);
  const auto experts = top_k_index.contiguous();
  auto result = allocate(experts, sizes, num_experts);
  auto& [sorted_pairs, block_expert, padded_offsets, pair_position] = result;
  int32_t* out[4] = {sorted_pairs.data_ptr<int32_t>(), block_expert.data_ptr<int32_t>(),
                     padded_offsets.data_ptr<int32_t>(), pair_position.data_ptr<int32_t>()};
  if (experts.scalar_type() == at::kLong) {
    align_cpu(experts.data_ptr<int64_t>(), sizes, num_experts, block_size, out[0], out[1], out[2], out[3]);
  } else {
    align_cpu(experts.data_ptr<int32_t>(), sizes, num_experts, block_size, out[0], out[1], out[2], out[3]);
  }
  return result;
}

#ifdef PADFREE_WITH_CUDA
AlignResult moe_align_cuda(const at::Tensor& top_k_index, int64_t num_experts, int64_t block_size) {
  const AlignSizes sizes = check_and_size(top_k_index, num_experts, block_size);
  TORCH_CHECK(num_experts <= kMaxCudaExperts, "moe_align: the CUDA kernel handles at most ", kMaxCudaExperts,
              " experts, got ", num_experts);
  const c10::DeviceGuard guard(top_k_index.device());
  const auto experts = top_k_index.contiguous();
  auto result = allocate(experts, sizes, num_experts);
  auto& [sorted_pairs, block_expert, padded_offsets, pair_position] = result;
  const int64_t chunk = padfree_moe_align_chunk_size();
  const int64_t num_chunks = (sizes.num_pairs + chunk - 1) / chunk;
  auto chunk_counts = at::empty({std::max<int64_t>(num_chunks, 1) * num_experts}, experts.options().dtype(at::kInt));
  auto totals = at::empty({num_experts}, experts.options().dtype(at::kInt));
  void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(experts.device()).native_handle();
  padfree_launch_moe_align(experts.data_ptr(), experts.scalar_type() == at::kLong, sizes.num_pairs, num_experts,
                           block_size, chunk_counts.data_ptr<int32_t>(), totals.data_ptr<int32_t>(),
                           sorted_pairs.data_ptr<int32_t>(), block_expert.data_ptr<int32_t>(),
                           padded_offsets.data_ptr<int32_t>(), pair_position.data_ptr<int32_t>(), stream);
  return result;
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(padfree, m) {
  m.def("moe_align(Tensor top_k_index, int num_experts, int block_size) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(padfree, CPU, m) { m.impl("moe_align", &moe_align_cpu); }

#ifdef PADFREE_WITH_CUDA
TORCH_LIBRARY_IMPL(padfree, CUDA, m) { m.impl("moe_align", &moe_align_cuda); }
#endif
