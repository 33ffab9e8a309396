// padfree::cu_seqlens_from_position_ids: packed position_ids -> (cu_seqlens, max_seqlen) with no
// device->host copy, so a padding-free batch can go straight to varlen attention.
//
// A new sequence starts at the first token of every row (last dimension) and wherever
// position_ids[i] != position_ids[i - 1] + 1. The number of sequences is not known on the host,
// so cu_seqlens has numel + 1 entries: the S real offsets, then numel repeated (empty sequences,
// which attention skips). max_seqlen is a 0-d int32 tensor on the same device.
#include <torch/all.h>

#include <algorithm>
#include <cstdint>

#ifdef PADFREE_WITH_CUDA
#include <c10/core/DeviceGuard.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>
// Defined in seqlens_cuda.cu; `stream` is a cudaStream_t.
void padfree_launch_cu_seqlens_from_position_ids(const int64_t* position_ids, int64_t numel,
                                                 int64_t row_length, int32_t* cu_seqlens,
                                                 int32_t* max_seqlen, void* stream);
#endif

namespace {

void check_position_ids(const at::Tensor& position_ids) {
  TORCH_CHECK(position_ids.scalar_type() == at::kLong,
              "position_ids must be int64, got ", position_ids.scalar_type());
  TORCH_CHECK(position_ids.dim() >= 1 && position_ids.numel() > 0,
              "position_ids must be a non-empty tensor of shape (..., seq_len)");
  TORCH_CHECK(position_ids.numel() < (int64_t{1} << 31) - 1,
              "position_ids has ", position_ids.numel(), " tokens; cu_seqlens is int32");
}

std::tuple<at::Tensor, at::Tensor> cu_seqlens_from_position_ids_cpu(const at::Tensor& position_ids) {
  check_position_ids(position_ids);
  const auto ids = position_ids.contiguous();
  const int64_t numel = ids.numel();
  const int64_t row_length = ids.size(-1);
  auto cu_seqlens = at::empty({numel + 1}, ids.options().dtype(at::kInt));
  auto max_seqlen = at::empty({}, ids.options().dtype(at::kInt));
  const int64_t* pos = ids.data_ptr<int64_t>();
  int32_t* cu = cu_seqlens.data_ptr<int32_t>();
  int64_t count = 0;
  int64_t last_start = 0;
  int64_t longest = 0;
  for (int64_t i = 0; i < numel; ++i) {
    if (i % row_length == 0 || pos[i] != pos[i - 1] + 1) {
      longest = std::max(longest, i - last_start);
      last_start = i;
      cu[count++] = static_cast<int32_t>(i);
    }
  }
  longest = std::max(longest, numel - last_start);
  for (int64_t j = count; j <= numel; ++j) cu[j] = static_cast<int32_t>(numel);
  *max_seqlen.data_ptr<int32_t>() = static_cast<int32_t>(longest);
  return {cu_seqlens, max_seqlen};
}

#ifdef PADFREE_WITH_CUDA
std::tuple<at::Tensor, at::Tensor> cu_seqlens_from_position_ids_cuda(const at::Tensor& position_ids) {
  check_position_ids(position_ids);
  const c10::DeviceGuard guard(position_ids.device());
  const auto ids = position_ids.contiguous();
  auto cu_seqlens = at::empty({ids.numel() + 1}, ids.options().dtype(at::kInt));
  auto max_seqlen = at::empty({}, ids.options().dtype(at::kInt));
  void* stream = c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(ids.device()).native_handle();
  padfree_launch_cu_seqlens_from_position_ids(ids.data_ptr<int64_t>(), ids.numel(), ids.size(-1),
                                              cu_seqlens.data_ptr<int32_t>(), max_seqlen.data_ptr<int32_t>(),
                                              stream);
  return {cu_seqlens, max_seqlen};
}
#endif

}  // namespace

TORCH_LIBRARY_FRAGMENT(padfree, m) {
  m.def("cu_seqlens_from_position_ids(Tensor position_ids) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(padfree, CPU, m) {
  m.impl("cu_seqlens_from_position_ids", &cu_seqlens_from_position_ids_cpu);
}

#ifdef PADFREE_WITH_CUDA
TORCH_LIBRARY_IMPL(padfree, CUDA, m) {
  m.impl("cu_seqlens_from_position_ids", &cu_seqlens_from_position_ids_cuda);
}
#endif
