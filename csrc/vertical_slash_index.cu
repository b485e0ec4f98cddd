// CUDA kernel of convert_vertical_slash_index: MInference's vertical-slash pattern turned into
// the per-query-block lists a block-sparse attention kernel walks (see csrc/README.md; the
// format is specified in sae_fast/ops/attention_index.py, and the torch reference
// sae_fast/reference/attention_index.py computes the same tensors bit for bit).
//
// Design: one thread per (batch, head, query block). The host sorts both index lists (a
// segmented at::sort along the last dimension, so any input order works); then each thread
//   1. walks the diagonal offsets in descending order -- their key spans in ascending
//      order -- and covers their union greedily with block_n-wide ranges (each range starts
//      at the first key of the union not yet covered), writing the starts to its row;
//   2. walks the verticals in ascending order, merging against its own ranges with a second
//      pointer: a distinct vertical below the block's last row that lies in no range becomes
//      a column.
// Both walks read every index at most once and stop early (padding, keys past the block).
// Threads of a warp hold consecutive query blocks of one (batch, head) and read the same
// list element at the same step, so list loads are broadcasts. Each thread also writes the
// zero padding of its rows, so every output element is written by exactly one thread.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <tuple>

namespace sae_fast {
namespace {

constexpr int kIndexThreads = 128;
constexpr int64_t kIndexMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kIndexMaxGridY = 65535;

struct VerticalSlashParams {
  const int64_t* seq_lens;  // [B], contiguous
  int32_t* block_count;     // [B, H, NQB]
  int32_t* block_offset;    // [B, H, NQB, max_blocks]
  int32_t* column_count;    // [B, H, NQB]
  int32_t* column_index;    // [B, H, NQB, max_cols]
  int64_t num_bh;           // B * H
  int64_t heads;
  int64_t nqb;
  int64_t nv;
  int64_t ns;
  int64_t context_len;
  int64_t block_m;
  int64_t block_n;
  int64_t max_blocks;
  int64_t max_cols;
};

// The lists of query block qb of one (batch, head): v and s are that head's sorted lists, n
// its sequence length, row the flat (batch, head, query block) index of the outputs. Host
// and device code alike (plain integer logic).
template <typename vert_t, typename slash_t>
__host__ __device__ inline void index_one_query_block(
    const vert_t* v, const slash_t* s, int64_t n, int64_t qb, int64_t row, const VerticalSlashParams& p) {
  n = n < 0 ? 0 : (n > p.context_len ? p.context_len : n);
  const int64_t m0 = qb * p.block_m;
  int64_t m1 = m0 + p.block_m < n ? m0 + p.block_m : n;
  if (m1 <= m0) m1 = 0;  // an empty query block: no diagonal or vertical passes the tests below

  // 1. Ranges: greedy cover of the diagonal spans [max(0, m0 - o), m1 - o).
  int32_t* offsets = p.block_offset + row * p.max_blocks;
  int64_t count = 0;
  int64_t covered_end = 0;  // keys below it are covered by the ranges placed so far
  for (int64_t k = p.ns - 1; k >= 0; --k) {
    const int64_t o = static_cast<int64_t>(s[k]);
    if (o < 0) break;  // padding: sorted ascending, the rest is padding too
    const int64_t end = m1 - o;
    if (end <= covered_end) {
      // Covered already, or a diagonal that misses the block (o >= m1). Ends grow as o
      // falls, but only up to m1: once the cover reaches m1 nothing is left to place.
      if (covered_end >= m1) break;
      continue;
    }
    int64_t start = m0 - o > 0 ? m0 - o : 0;
    if (start < covered_end) start = covered_end;
    for (; start < end; start += p.block_n) {
      if (count < p.max_blocks) offsets[count] = static_cast<int32_t>(start);
      ++count;
    }
    covered_end = start;
  }
  if (count > p.max_blocks) count = p.max_blocks;  // cannot happen (see index_buffer_sizes)
  for (int64_t k = count; k < p.max_blocks; ++k) offsets[k] = 0;
  p.block_count[row] = static_cast<int32_t>(count);

  // 2. Columns: distinct verticals in [0, m1) outside every range.
  int32_t* columns = p.column_index + row * p.max_cols;
  int64_t ncol = 0;
  int64_t r = 0;  // first range that may contain the current vertical
  int64_t prev = -1;
  for (int64_t k = 0; k < p.nv; ++k) {
    const int64_t j = static_cast<int64_t>(v[k]);
    if (j < 0 || j == prev) continue;  // padding (sorted first) or a duplicate
    if (j >= m1) break;
    prev = j;
    while (r < count && offsets[r] + p.block_n <= j) ++r;
    if (r < count && offsets[r] <= j) continue;  // inside range r
    if (ncol < p.max_cols) columns[ncol] = static_cast<int32_t>(j);
    ++ncol;
  }
  if (ncol > p.max_cols) ncol = p.max_cols;  // cannot happen: distinct keys below L
  for (int64_t k = ncol; k < p.max_cols; ++k) columns[k] = 0;
  p.column_count[row] = static_cast<int32_t>(ncol);
}

// One thread per query block (x), (batch, head) pairs over y (a grid-stride loop past 65535).
template <typename vert_t, typename slash_t>
__global__ void __launch_bounds__(kIndexThreads) vertical_slash_index_kernel(
    const vert_t* __restrict__ vertical,  // [B, H, NV] sorted ascending along NV, contiguous
    const slash_t* __restrict__ slash,    // [B, H, NS] sorted ascending along NS, contiguous
    VerticalSlashParams p) {
  const int64_t qb = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (qb >= p.nqb) return;
  for (int64_t bh = blockIdx.y; bh < p.num_bh; bh += gridDim.y) {
    index_one_query_block(vertical + bh * p.nv, slash + bh * p.ns, p.seq_lens[bh / p.heads], qb, bh * p.nqb + qb, p);
  }
}

bool poison_index_outputs() {
  static const bool poison = [] {
    const char* v = std::getenv("SAE_FAST_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return poison;
}

// int32 output; tests (SAE_FAST_POISON_OUTPUTS=1) fill it with -1 first, a value no correct
// output element takes, so an element the kernel forgets to write fails the comparison.
at::Tensor new_index_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options.dtype(at::kInt).memory_format(at::MemoryFormat::Contiguous));
  if (poison_index_outputs()) out.fill_(-1);
  return out;
}

int64_t cdiv(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

bool is_power_of_two(int64_t x) {
  return x > 0 && (x & (x - 1)) == 0;
}

void check_index_list(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.dim() == 3, op, ": ", name, " must be 3-D [B, H, N], got shape ", t.sizes());
  TORCH_CHECK(
      t.scalar_type() == at::kInt || t.scalar_type() == at::kLong, op, ": ", name, " must be int32 or int64, got ",
      t.scalar_type());
}

template <typename F>
void dispatch_index_type(at::ScalarType t, F&& f) {
  if (t == at::kInt) {
    f(int32_t{});
  } else {
    f(int64_t{});
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> convert_vertical_slash_index_cuda(
    const at::Tensor& vertical_idx, const at::Tensor& slash_idx, const at::Tensor& seq_lens, int64_t context_len,
    int64_t block_m, int64_t block_n) {
  constexpr const char* op = "convert_vertical_slash_index";
  check_index_list(vertical_idx, op, "vertical_idx");
  check_index_list(slash_idx, op, "slash_idx");
  TORCH_CHECK(
      slash_idx.device() == vertical_idx.device(), op, ": slash_idx is on ", slash_idx.device(),
      " but vertical_idx is on ", vertical_idx.device());
  TORCH_CHECK(
      seq_lens.device() == vertical_idx.device(), op, ": seq_lens is on ", seq_lens.device(),
      " but vertical_idx is on ", vertical_idx.device());
  const int64_t B = vertical_idx.size(0);
  const int64_t H = vertical_idx.size(1);
  TORCH_CHECK(
      slash_idx.size(0) == B && slash_idx.size(1) == H, op, ": slash_idx must be [B, H, NS] = [", B, ", ", H,
      ", NS] like vertical_idx, got ", slash_idx.sizes());
  TORCH_CHECK(
      seq_lens.dim() == 1 && seq_lens.size(0) == B, op, ": seq_lens must have shape [B] = [", B, "], got ",
      seq_lens.sizes());
  TORCH_CHECK(
      seq_lens.scalar_type() == at::kInt || seq_lens.scalar_type() == at::kLong, op,
      ": seq_lens must be int32 or int64, got ", seq_lens.scalar_type());
  TORCH_CHECK(
      block_m >= 16 && is_power_of_two(block_m), op, ": block_m must be a power of two >= 16, got ", block_m);
  TORCH_CHECK(
      block_n >= 16 && is_power_of_two(block_n), op, ": block_n must be a power of two >= 16, got ", block_n);
  TORCH_CHECK(
      context_len >= 0 && context_len <= std::numeric_limits<int32_t>::max(), op,
      ": context_len must lie in [0, 2^31 - 1] (outputs are int32), got ", context_len);

  const int64_t nv = vertical_idx.size(2);
  const int64_t ns = slash_idx.size(2);
  const int64_t nqb = cdiv(context_len, block_m);
  const int64_t blocks_by_len = cdiv(context_len, block_n);
  const int64_t blocks_by_slash = ns * cdiv(block_m, block_n);
  const int64_t max_blocks = blocks_by_len < blocks_by_slash ? blocks_by_len : blocks_by_slash;
  const int64_t max_cols = nv < context_len ? nv : context_len;

  c10::cuda::CUDAGuard device_guard(vertical_idx.device());
  const auto options = vertical_idx.options();
  at::Tensor block_count = new_index_output({B, H, nqb}, options);
  at::Tensor block_offset = new_index_output({B, H, nqb, max_blocks}, options);
  at::Tensor column_count = new_index_output({B, H, nqb}, options);
  at::Tensor column_index = new_index_output({B, H, nqb, max_cols}, options);
  const int64_t num_bh = B * H;
  if (num_bh == 0 || nqb == 0) return {block_count, block_offset, column_count, column_index};

  // Sorted copies (any input order is accepted): verticals ascending, offsets ascending
  // (the kernel walks them from the end). Padding (< 0) sorts first in both.
  const at::Tensor vertical = nv > 0 ? std::get<0>(at::sort(vertical_idx, /*dim=*/-1)).contiguous() : vertical_idx;
  const at::Tensor slash = ns > 0 ? std::get<0>(at::sort(slash_idx, /*dim=*/-1)).contiguous() : slash_idx;
  const at::Tensor lens = seq_lens.to(at::kLong).contiguous();

  VerticalSlashParams p;
  p.seq_lens = lens.data_ptr<int64_t>();
  p.block_count = block_count.data_ptr<int32_t>();
  p.block_offset = block_offset.data_ptr<int32_t>();
  p.column_count = column_count.data_ptr<int32_t>();
  p.column_index = column_index.data_ptr<int32_t>();
  p.num_bh = num_bh;
  p.heads = H;
  p.nqb = nqb;
  p.nv = nv;
  p.ns = ns;
  p.context_len = context_len;
  p.block_m = block_m;
  p.block_n = block_n;
  p.max_blocks = max_blocks;
  p.max_cols = max_cols;

  const int64_t grid_x = cdiv(nqb, kIndexThreads);
  TORCH_CHECK(grid_x <= kIndexMaxGridX, op, ": context_len = ", context_len, " is too long for one launch");
  const dim3 grid(static_cast<unsigned>(grid_x), static_cast<unsigned>(num_bh < kIndexMaxGridY ? num_bh : kIndexMaxGridY));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_index_type(vertical.scalar_type(), [&](auto vert_tag) {
    dispatch_index_type(slash.scalar_type(), [&](auto slash_tag) {
      using vert_t = decltype(vert_tag);
      using slash_t = decltype(slash_tag);
      vertical_slash_index_kernel<vert_t, slash_t>
          <<<grid, kIndexThreads, 0, stream>>>(vertical.data_ptr<vert_t>(), slash.data_ptr<slash_t>(), p);
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {block_count, block_offset, column_count, column_index};
}

}  // namespace
}  // namespace sae_fast

TORCH_LIBRARY_IMPL(sae_fast, CUDA, m) {
  m.impl("convert_vertical_slash_index", &sae_fast::convert_vertical_slash_index_cuda);
}
