// CUDA kernels of the two sparse products behind sparse decode (see csrc/README.md):
//   csr_gather_sum  out[r, :] = sum_{e in row r} coef[e] * src[col[e], :] (+ bias)
//   gathered_dot    out[n, j] = <grad[n, :], src[col[n, j], :]>
// Both are memory-bound gathers of whole src rows; fp32 accumulation, int64 offsets, no
// atomics (every output element is summed by one thread in a fixed order: deterministic).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <optional>

namespace sae_fast {
namespace {

constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int64_t kMaxGridX = std::numeric_limits<int32_t>::max();
constexpr int64_t kMaxGridY = 65535;

// ---------------------------------------------------------------------------------------
// Element access. Data moves as raw bits (so loads can be 16-byte vectors whatever the
// dtype) and becomes fp32 only in registers.

template <typename T>
struct ElemBits;  // unsigned integer type of one element's bits
template <>
struct ElemBits<float> {
  using type = unsigned int;
};
template <>
struct ElemBits<at::Half> {
  using type = unsigned short;
};
template <>
struct ElemBits<at::BFloat16> {
  using type = unsigned short;
};

template <typename T>
__device__ __forceinline__ float bits_to_float(unsigned int bits);
template <>
__device__ __forceinline__ float bits_to_float<float>(unsigned int bits) {
  return __uint_as_float(bits);
}
template <>
__device__ __forceinline__ float bits_to_float<at::Half>(unsigned int bits) {
  return __half2float(__ushort_as_half(static_cast<unsigned short>(bits)));
}
template <>
__device__ __forceinline__ float bits_to_float<at::BFloat16>(unsigned int bits) {
  return __uint_as_float(bits << 16);
}

template <typename T>
__device__ __forceinline__ unsigned int float_to_bits(float x);
template <>
__device__ __forceinline__ unsigned int float_to_bits<float>(float x) {
  return __float_as_uint(x);
}
template <>
__device__ __forceinline__ unsigned int float_to_bits<at::Half>(float x) {
  return __half_as_ushort(__float2half_rn(x));
}
template <>
__device__ __forceinline__ unsigned int float_to_bits<at::BFloat16>(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}

template <typename T>
__device__ __forceinline__ unsigned int load_bits(const T* p) {
  return __ldg(reinterpret_cast<const typename ElemBits<T>::type*>(p));
}

template <typename T>
__device__ __forceinline__ float load_elem(const T* p) {
  return bits_to_float<T>(load_bits(p));
}

template <typename T>
__device__ __forceinline__ void store_elem(T* p, float x) {
  using Bits = typename ElemBits<T>::type;
  *reinterpret_cast<Bits*>(p) = static_cast<Bits>(float_to_bits<T>(x));
}

// Elements in one 16-byte vector.
template <typename T>
constexpr int vec16_elems() {
  return 16 / static_cast<int>(sizeof(T));
}

__device__ __forceinline__ unsigned int word_of(const uint4& v, int i) {
  return i == 0 ? v.x : (i == 1 ? v.y : (i == 2 ? v.z : v.w));
}

// Element i of a 16-byte vector of T (i is a compile-time constant after unrolling).
template <typename T>
__device__ __forceinline__ float vec16_elem(const uint4& v, int i) {
  if constexpr (sizeof(T) == 4) {
    return bits_to_float<T>(word_of(v, i));
  } else {
    const unsigned int w = word_of(v, i >> 1);
    return bits_to_float<T>((i & 1) ? (w >> 16) : (w & 0xffffu));
  }
}

template <typename T>
__device__ __forceinline__ void store_vec16(T* p, const float* x) {
  constexpr int kElems = vec16_elems<T>();
  unsigned int w[4];
  if constexpr (sizeof(T) == 4) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = float_to_bits<T>(x[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = float_to_bits<T>(x[2 * i]) | (float_to_bits<T>(x[2 * i + 1]) << 16);
  }
  static_assert(kElems * sizeof(T) == 16, "16-byte vectors");
  *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// The VEC elements one lane owns in a tile of 32 * VEC columns, read from a src row.
//   VECTORIZED: columns first .. first + VEC - 1, one 16-byte load (needs unit column stride,
//               d % VEC == 0 and 16-byte aligned rows). first = (tile * 32 + lane) * VEC.
//   otherwise:  columns first + 32 * i (lane-interleaved so each scalar load is coalesced),
//               any column stride, masked at d. first = tile * 32 * VEC + lane.
template <typename T, int VEC, bool VECTORIZED>
struct LaneFrag;

template <typename T, int VEC>
struct LaneFrag<T, VEC, true> {
  static_assert(VEC == vec16_elems<T>(), "vectorized fragments are one 16-byte vector");
  uint4 raw;
  __device__ __forceinline__ static int64_t column(int64_t first, int i) { return first + i; }
  __device__ __forceinline__ void clear() { raw = make_uint4(0u, 0u, 0u, 0u); }
  __device__ __forceinline__ void load(const T* row, int64_t first, int64_t /*stride_col*/, int64_t /*d*/) {
    raw = __ldg(reinterpret_cast<const uint4*>(row + first));
  }
  __device__ __forceinline__ float get(int i) const { return vec16_elem<T>(raw, i); }
};

template <typename T, int VEC>
struct LaneFrag<T, VEC, false> {
  unsigned int raw[VEC];
  __device__ __forceinline__ static int64_t column(int64_t first, int i) { return first + int64_t{kWarpSize} * i; }
  __device__ __forceinline__ void clear() {
#pragma unroll
    for (int i = 0; i < VEC; ++i) raw[i] = 0u;
  }
  __device__ __forceinline__ void load(const T* row, int64_t first, int64_t stride_col, int64_t d) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t c = column(first, i);
      raw[i] = c < d ? load_bits(row + c * stride_col) : 0u;
    }
  }
  __device__ __forceinline__ float get(int i) const { return bits_to_float<T>(raw[i]); }
};

template <int VEC, bool VECTORIZED>
__device__ __forceinline__ int64_t lane_first_column(int64_t tile, int lane) {
  return VECTORIZED ? (tile * kWarpSize + lane) * VEC : tile * kWarpSize * VEC + lane;
}

__device__ __forceinline__ float warp_sum(float x) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) x += __shfl_xor_sync(kFullMask, x, offset);
  return x;
}

// ---------------------------------------------------------------------------------------
// csr_gather_sum
//
// Block = 8 warps = 8 consecutive output rows; grid.y = column tiles of 32 lanes * VEC.
// A row of at most heavy_min_entries entries is summed by its own warp; a longer row (a
// dense latent in the weight gradient) is split across all 8 warps and their partial sums
// are added in warp order through shared memory, so one long row cannot stall the grid
// and the result stays deterministic.

constexpr int kGatherWarps = 8;
constexpr int kGatherThreads = kGatherWarps * kWarpSize;
constexpr int kGatherEntryUnroll = 8;  // src rows in flight per lane
constexpr int64_t kHeavyRowCsr = 128;  // longer CSR rows are split across the block
constexpr int64_t kHeavyRowUniform = 512;
constexpr int64_t kShortRowEntries = 16;  // mean row length below which grid.y is 1
static_assert(kWarpSize % kGatherEntryUnroll == 0, "entry batches must tile a 32-entry chunk");

template <typename scalar_t, typename index_t>
struct CsrGatherSumParams {
  const scalar_t* coef;
  int64_t coef_stride;
  const index_t* col;
  int64_t col_stride;
  const int64_t* row_offsets;  // nullptr: uniform rows of k_uniform entries
  int64_t row_offsets_stride;
  int64_t k_uniform;
  int64_t num_entries;
  int64_t num_rows;
  const scalar_t* src;
  int64_t src_stride_row;
  int64_t src_stride_col;
  int64_t d;
  const scalar_t* bias;  // nullptr: no bias
  int64_t bias_stride;
  scalar_t* out;  // [num_rows, d] contiguous
  int64_t num_tiles;
  int64_t heavy_min_entries;
};

// acc[i] += sum over entries [begin, end) of coef[e] * src[col[e], column i], in entry order.
// The warp loads 32 (col, coef) pairs at once and broadcasts them by shuffle; then each lane
// issues kGatherEntryUnroll independent src loads before using any of them.
template <typename scalar_t, typename index_t, int VEC, bool VECTORIZED>
__device__ __forceinline__ void csr_accumulate(
    const CsrGatherSumParams<scalar_t, index_t>& p, int64_t begin, int64_t end, int64_t first, int lane,
    float (&acc)[VEC]) {
  using Frag = LaneFrag<scalar_t, VEC, VECTORIZED>;
  const bool lane_has_columns = first < p.d;
  for (int64_t chunk = begin; chunk < end; chunk += kWarpSize) {
    const int count = static_cast<int>(end - chunk < kWarpSize ? end - chunk : kWarpSize);
    int64_t lane_offset = 0;
    float lane_coef = 0.f;
    if (lane < count) {
      const int64_t e = chunk + lane;
      lane_offset = static_cast<int64_t>(__ldg(p.col + e * p.col_stride)) * p.src_stride_row;
      lane_coef = load_elem(p.coef + e * p.coef_stride);
    }
    for (int j = 0; j < count; j += kGatherEntryUnroll) {
      Frag frag[kGatherEntryUnroll];
      float coef[kGatherEntryUnroll];
#pragma unroll
      for (int u = 0; u < kGatherEntryUnroll; ++u) {
        const int64_t offset = __shfl_sync(kFullMask, lane_offset, j + u);
        coef[u] = __shfl_sync(kFullMask, lane_coef, j + u);
        if (j + u < count && lane_has_columns) {
          frag[u].load(p.src + offset, first, p.src_stride_col, p.d);
        } else {
          frag[u].clear();
        }
      }
#pragma unroll
      for (int u = 0; u < kGatherEntryUnroll; ++u) {
        if (j + u < count) {
#pragma unroll
          for (int i = 0; i < VEC; ++i) acc[i] = fmaf(coef[u], frag[u].get(i), acc[i]);
        }
      }
    }
  }
}

template <typename scalar_t, typename index_t, int VEC, bool VECTORIZED>
__device__ __forceinline__ void csr_write_row(
    const CsrGatherSumParams<scalar_t, index_t>& p, int64_t row, int64_t first, float (&acc)[VEC]) {
  using Frag = LaneFrag<scalar_t, VEC, VECTORIZED>;
  if (first >= p.d) return;
  if (p.bias != nullptr) {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t c = Frag::column(first, i);
      if (c < p.d) acc[i] += load_elem(p.bias + c * p.bias_stride);
    }
  }
  scalar_t* out_row = p.out + row * p.d;
  if constexpr (VECTORIZED) {
    store_vec16(out_row + first, acc);
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) {
      const int64_t c = Frag::column(first, i);
      if (c < p.d) store_elem(out_row + c, acc[i]);
    }
  }
}

// kernel-report: allow spills in csr_gather_sum_kernel: 3 blocks/SM caps registers at 80 and the 16-byte vector path spills 24-32 B to L1 on sm_90; measured as is on an H100 (0.61 ms, 133% of copy bandwidth at the main decode shape); trading occupancy for no spills needs a GPU measurement first.
template <typename scalar_t, typename index_t, int VEC, bool VECTORIZED>
__global__ void __launch_bounds__(kGatherThreads, 3)
    csr_gather_sum_kernel(const CsrGatherSumParams<scalar_t, index_t> p) {
  __shared__ int64_t s_row_start[kGatherWarps + 1];
  __shared__ float s_partial[kGatherWarps][VEC][kWarpSize];  // [warp][elem][lane]: no bank conflicts

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int64_t first_row = static_cast<int64_t>(blockIdx.x) * kGatherWarps;

  // Row starts of this block's rows, clamped to [0, E] so bad offsets cannot read out of bounds.
  if (threadIdx.x <= kGatherWarps) {
    const int64_t r = first_row + threadIdx.x < p.num_rows ? first_row + threadIdx.x : p.num_rows;
    const int64_t start = p.row_offsets != nullptr ? p.row_offsets[r * p.row_offsets_stride] : r * p.k_uniform;
    s_row_start[threadIdx.x] = start < 0 ? 0 : (start > p.num_entries ? p.num_entries : start);
  }
  __syncthreads();

  for (int64_t tile = blockIdx.y; tile < p.num_tiles; tile += gridDim.y) {
    const int64_t first = lane_first_column<VEC, VECTORIZED>(tile, lane);

    // Light rows: one warp per row, no block synchronisation.
    const int64_t my_row = first_row + warp;
    if (my_row < p.num_rows) {
      const int64_t begin = s_row_start[warp];
      const int64_t end = s_row_start[warp + 1] > begin ? s_row_start[warp + 1] : begin;
      if (end - begin <= p.heavy_min_entries) {
        float acc[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
        csr_accumulate<scalar_t, index_t, VEC, VECTORIZED>(p, begin, end, first, lane, acc);
        csr_write_row<scalar_t, index_t, VEC, VECTORIZED>(p, my_row, first, acc);
      }
    }

    // Heavy rows: every warp sums a contiguous eighth; the loop conditions are block-uniform.
    for (int w = 0; w < kGatherWarps; ++w) {
      const int64_t row = first_row + w;
      if (row >= p.num_rows) break;
      const int64_t begin = s_row_start[w];
      const int64_t end = s_row_start[w + 1] > begin ? s_row_start[w + 1] : begin;
      if (end - begin <= p.heavy_min_entries) continue;
      const int64_t per_warp = (end - begin + kGatherWarps - 1) / kGatherWarps;
      const int64_t my_begin = begin + warp * per_warp < end ? begin + warp * per_warp : end;
      const int64_t my_end = my_begin + per_warp < end ? my_begin + per_warp : end;
      float acc[VEC];
#pragma unroll
      for (int i = 0; i < VEC; ++i) acc[i] = 0.f;
      csr_accumulate<scalar_t, index_t, VEC, VECTORIZED>(p, my_begin, my_end, first, lane, acc);
#pragma unroll
      for (int i = 0; i < VEC; ++i) s_partial[warp][i][lane] = acc[i];
      __syncthreads();
      if (warp == 0) {
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
          float total = s_partial[0][i][lane];
#pragma unroll
          for (int ww = 1; ww < kGatherWarps; ++ww) total += s_partial[ww][i][lane];
          acc[i] = total;
        }
        csr_write_row<scalar_t, index_t, VEC, VECTORIZED>(p, row, first, acc);
      }
      __syncthreads();  // s_partial is reused by the next heavy row
    }
  }
}

// ---------------------------------------------------------------------------------------
// gathered_dot
//
// Block = one row n of grad, up to 8 warps. grad[n] is staged once in shared memory (native
// dtype, dynamic size d) with the src offsets of up to 256 entries; then each warp takes
// groups of kDotEntries entries and streams their src rows, kDotStepUnroll column steps at a
// time, so kDotEntries * kDotStepUnroll independent loads are in flight per lane. A butterfly
// shuffle reduces each dot product. No synchronisation per entry.

constexpr int kDotMaxWarps = 8;
constexpr int kDotMaxThreads = kDotMaxWarps * kWarpSize;
constexpr int kDotEntries = 2;
constexpr int kDotStepUnroll = 4;
constexpr int kDotIndexChunk = 256;
constexpr int kDotStaticSmemBytes = kDotIndexChunk * static_cast<int>(sizeof(int64_t));

template <typename scalar_t, typename index_t>
struct GatheredDotParams {
  const scalar_t* grad;
  int64_t grad_stride_row;
  int64_t grad_stride_col;
  bool grad_vectorizable;  // unit column stride, d % 16B == 0, 16-byte aligned rows
  const index_t* col;
  int64_t col_stride_row;
  int64_t col_stride_col;
  int64_t k;
  const scalar_t* src;
  int64_t src_stride_row;
  int64_t src_stride_col;
  int64_t d;
  scalar_t* out;  // [N, k] contiguous
};

template <typename scalar_t, typename index_t, int VEC, bool VECTORIZED, bool GRAD_IN_SMEM>
__global__ void __launch_bounds__(kDotMaxThreads, 3)
    gathered_dot_kernel(const GatheredDotParams<scalar_t, index_t> p) {
  using Frag = LaneFrag<scalar_t, VEC, VECTORIZED>;
  using Bits = typename ElemBits<scalar_t>::type;
  static_assert(!VECTORIZED || GRAD_IN_SMEM, "the vectorized path reads grad from shared memory");
  extern __shared__ __align__(16) unsigned char s_dynamic[];
  __shared__ int64_t s_src_offset[kDotIndexChunk];

  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  const int64_t n = blockIdx.x;
  const scalar_t* grad_row = p.grad + n * p.grad_stride_row;
  Bits* s_grad = reinterpret_cast<Bits*>(s_dynamic);

  if constexpr (GRAD_IN_SMEM) {
    if (p.grad_vectorizable) {
      const int64_t num_vec = p.d / vec16_elems<scalar_t>();
      for (int64_t v = threadIdx.x; v < num_vec; v += blockDim.x) {
        reinterpret_cast<uint4*>(s_dynamic)[v] = __ldg(reinterpret_cast<const uint4*>(grad_row) + v);
      }
    } else {
      for (int64_t c = threadIdx.x; c < p.d; c += blockDim.x) {
        s_grad[c] = static_cast<Bits>(load_bits(grad_row + c * p.grad_stride_col));
      }
    }
  }

  const int64_t tile_width = int64_t{kWarpSize} * VEC;
  const int64_t num_steps = (p.d + tile_width - 1) / tile_width;

  for (int64_t chunk = 0; chunk < p.k; chunk += kDotIndexChunk) {
    const int count = static_cast<int>(p.k - chunk < kDotIndexChunk ? p.k - chunk : kDotIndexChunk);
    if (chunk > 0) __syncthreads();  // every warp is done with the previous offsets
    for (int t = threadIdx.x; t < count; t += blockDim.x) {
      const index_t c = __ldg(p.col + n * p.col_stride_row + (chunk + t) * p.col_stride_col);
      s_src_offset[t] = static_cast<int64_t>(c) * p.src_stride_row;
    }
    __syncthreads();  // also publishes s_grad on the first pass

    for (int group = warp * kDotEntries; group < count; group += num_warps * kDotEntries) {
      int64_t offset[kDotEntries];
      bool valid[kDotEntries];
#pragma unroll
      for (int e = 0; e < kDotEntries; ++e) {
        valid[e] = group + e < count;
        offset[e] = valid[e] ? s_src_offset[group + e] : 0;
      }
      float acc[kDotEntries];
#pragma unroll
      for (int e = 0; e < kDotEntries; ++e) acc[e] = 0.f;

      for (int64_t step0 = 0; step0 < num_steps; step0 += kDotStepUnroll) {
        Frag frag[kDotStepUnroll][kDotEntries];
#pragma unroll
        for (int s = 0; s < kDotStepUnroll; ++s) {
          const int64_t first = lane_first_column<VEC, VECTORIZED>(step0 + s, lane);
#pragma unroll
          for (int e = 0; e < kDotEntries; ++e) {
            if (first < p.d && valid[e]) {
              frag[s][e].load(p.src + offset[e], first, p.src_stride_col, p.d);
            } else {
              frag[s][e].clear();
            }
          }
        }
#pragma unroll
        for (int s = 0; s < kDotStepUnroll; ++s) {
          const int64_t first = lane_first_column<VEC, VECTORIZED>(step0 + s, lane);
          if (first >= p.d) continue;
          float g[VEC];
          if constexpr (VECTORIZED) {
            const uint4 raw = *reinterpret_cast<const uint4*>(s_grad + first);
#pragma unroll
            for (int i = 0; i < VEC; ++i) g[i] = vec16_elem<scalar_t>(raw, i);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
              const int64_t c = Frag::column(first, i);
              if (c >= p.d) {
                g[i] = 0.f;
              } else if constexpr (GRAD_IN_SMEM) {
                g[i] = bits_to_float<scalar_t>(s_grad[c]);
              } else {
                g[i] = load_elem(grad_row + c * p.grad_stride_col);
              }
            }
          }
#pragma unroll
          for (int e = 0; e < kDotEntries; ++e) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) acc[e] = fmaf(g[i], frag[s][e].get(i), acc[e]);
          }
        }
      }

#pragma unroll
      for (int e = 0; e < kDotEntries; ++e) acc[e] = warp_sum(acc[e]);
      if (lane == 0) {
        scalar_t* out_row = p.out + n * p.k + chunk + group;
#pragma unroll
        for (int e = 0; e < kDotEntries; ++e) {
          if (valid[e]) store_elem(out_row + e, acc[e]);
        }
      }
    }
  }
}

// ---------------------------------------------------------------------------------------
// Host side.

// Tests set SAE_FAST_POISON_OUTPUTS=1 so that an output element a kernel forgets to write
// shows up as NaN instead of as whatever the caching allocator left there.
bool poison_outputs() {
  static const bool poison = [] {
    const char* v = std::getenv("SAE_FAST_POISON_OUTPUTS");
    return v != nullptr && std::strcmp(v, "1") == 0;
  }();
  return poison;
}

at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options.memory_format(at::MemoryFormat::Contiguous));
  if (poison_outputs()) out.fill_(NAN);
  return out;
}

bool aligned16(const void* p) {
  return reinterpret_cast<uintptr_t>(p) % 16 == 0;
}

// Rows of a 2-D tensor can be read as 16-byte vectors of `vec` elements.
bool rows_vectorizable(const at::Tensor& t, int64_t vec) {
  const int64_t d = t.size(1);
  return d % vec == 0 && (d <= 1 || t.stride(1) == 1) && (t.size(0) <= 1 || t.stride(0) % vec == 0) &&
      aligned16(t.data_ptr());
}

void check_float_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(
      dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op, ": ", name,
      " must be float32, float16 or bfloat16, got ", dt);
}

void check_index_dtype(const at::Tensor& t, const char* op, const char* name) {
  const auto dt = t.scalar_type();
  TORCH_CHECK(dt == at::kInt || dt == at::kLong, op, ": ", name, " must be int32 or int64, got ", dt);
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op, const char* name) {
  TORCH_CHECK(
      t.device() == ref.device(), op, ": ", name, " must be on the same device as the other inputs (", ref.device(),
      "), got ", t.device());
}

template <typename scalar_t, typename index_t>
void launch_csr_gather_sum(
    const at::Tensor& coef, const at::Tensor& col, const std::optional<at::Tensor>& row_offsets, int64_t num_rows,
    const at::Tensor& src, const std::optional<at::Tensor>& bias, at::Tensor& out) {
  CsrGatherSumParams<scalar_t, index_t> p;
  const int64_t num_entries = coef.numel();
  p.coef = coef.data_ptr<scalar_t>();
  p.coef_stride = coef.stride(0);
  p.col = col.data_ptr<index_t>();
  p.col_stride = col.stride(0);
  p.row_offsets = row_offsets.has_value() ? row_offsets->data_ptr<int64_t>() : nullptr;
  p.row_offsets_stride = row_offsets.has_value() ? row_offsets->stride(0) : 0;
  p.k_uniform = row_offsets.has_value() ? 0 : num_entries / num_rows;
  p.num_entries = num_entries;
  p.num_rows = num_rows;
  p.src = src.data_ptr<scalar_t>();
  p.src_stride_row = src.stride(0);
  p.src_stride_col = src.stride(1);
  p.d = src.size(1);
  p.bias = bias.has_value() ? bias->data_ptr<scalar_t>() : nullptr;
  p.bias_stride = bias.has_value() ? bias->stride(0) : 0;
  p.out = out.data_ptr<scalar_t>();
  p.heavy_min_entries = row_offsets.has_value() ? kHeavyRowCsr : kHeavyRowUniform;

  constexpr int kVec = vec16_elems<scalar_t>();
  constexpr int kScalarVec = 4;
  const bool vectorized = rows_vectorizable(src, kVec);
  const int64_t tile_width = int64_t{kWarpSize} * (vectorized ? kVec : kScalarVec);
  p.num_tiles = (p.d + tile_width - 1) / tile_width;

  const int64_t row_blocks = (num_rows + kGatherWarps - 1) / kGatherWarps;
  TORCH_CHECK(row_blocks <= kMaxGridX, "csr_gather_sum: num_rows = ", num_rows, " is too large for one launch");
  // Short rows (the weight gradient: a few entries per latent) give each warp too little
  // work per column tile; then one block walks all tiles of its rows (the kernel loops).
  const int64_t mean_entries = num_entries / num_rows;
  const int64_t tiles_y = mean_entries < kShortRowEntries ? 1 : (p.num_tiles < kMaxGridY ? p.num_tiles : kMaxGridY);
  const dim3 grid(static_cast<unsigned>(row_blocks), static_cast<unsigned>(tiles_y));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorized) {
    csr_gather_sum_kernel<scalar_t, index_t, kVec, true><<<grid, kGatherThreads, 0, stream>>>(p);
  } else {
    csr_gather_sum_kernel<scalar_t, index_t, kScalarVec, false><<<grid, kGatherThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Static plus dynamic shared memory over 48 KiB needs the kernel's opt-in attribute.
template <typename Kernel>
void allow_dynamic_smem(Kernel kernel, int64_t bytes) {
  if (bytes + kDotStaticSmemBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  }
}

template <typename scalar_t, typename index_t>
void launch_gathered_dot(const at::Tensor& grad, const at::Tensor& col, const at::Tensor& src, at::Tensor& out) {
  GatheredDotParams<scalar_t, index_t> p;
  constexpr int kVec = vec16_elems<scalar_t>();
  constexpr int kScalarVec = 4;
  p.grad = grad.data_ptr<scalar_t>();
  p.grad_stride_row = grad.stride(0);
  p.grad_stride_col = grad.stride(1);
  p.grad_vectorizable = rows_vectorizable(grad, kVec);
  p.col = col.data_ptr<index_t>();
  p.col_stride_row = col.stride(0);
  p.col_stride_col = col.stride(1);
  p.k = col.size(1);
  p.src = src.data_ptr<scalar_t>();
  p.src_stride_row = src.stride(0);
  p.src_stride_col = src.stride(1);
  p.d = src.size(1);
  p.out = out.data_ptr<scalar_t>();

  const int64_t n_rows = grad.size(0);
  TORCH_CHECK(n_rows <= kMaxGridX, "gathered_dot: ", n_rows, " rows are too many for one launch");
  const int64_t warps_wanted = (p.k + kDotEntries - 1) / kDotEntries;
  const int threads = static_cast<int>(warps_wanted < kDotMaxWarps ? warps_wanted : kDotMaxWarps) * kWarpSize;

  // grad[n] goes to shared memory when it fits (opt-in limit of this device).
  int max_smem_optin = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, src.get_device()));
  const int64_t grad_bytes = (p.d * static_cast<int64_t>(sizeof(scalar_t)) + 15) / 16 * 16;
  const bool grad_in_smem = grad_bytes <= static_cast<int64_t>(max_smem_optin) - kDotStaticSmemBytes;
  const bool vectorized = grad_in_smem && rows_vectorizable(src, kVec);

  const dim3 grid(static_cast<unsigned>(n_rows));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (vectorized) {
    auto kernel = gathered_dot_kernel<scalar_t, index_t, kVec, true, true>;
    allow_dynamic_smem(kernel, grad_bytes);
    kernel<<<grid, threads, grad_bytes, stream>>>(p);
  } else if (grad_in_smem) {
    auto kernel = gathered_dot_kernel<scalar_t, index_t, kScalarVec, false, true>;
    allow_dynamic_smem(kernel, grad_bytes);
    kernel<<<grid, threads, grad_bytes, stream>>>(p);
  } else {
    gathered_dot_kernel<scalar_t, index_t, kScalarVec, false, false><<<grid, threads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Calls f(scalar_t{}, index_t{}) for the runtime dtypes (tags carry the types; C++17).
template <typename F>
void dispatch_types(at::ScalarType data, at::ScalarType index, F&& f) {
  auto with_index = [&](auto data_tag) {
    if (index == at::kInt) {
      f(data_tag, int32_t{});
    } else {
      f(data_tag, int64_t{});
    }
  };
  switch (data) {
    case at::kFloat:
      with_index(float{});
      break;
    case at::kHalf:
      with_index(at::Half{});
      break;
    case at::kBFloat16:
      with_index(at::BFloat16{});
      break;
    default:
      TORCH_CHECK(false, "unsupported dtype ", data);
  }
}

at::Tensor csr_gather_sum_cuda(
    const at::Tensor& coef, const at::Tensor& col, const std::optional<at::Tensor>& row_offsets, int64_t num_rows,
    const at::Tensor& src, const std::optional<at::Tensor>& bias) {
  constexpr const char* op = "csr_gather_sum";
  TORCH_CHECK(src.is_cuda(), op, ": src must be a CUDA tensor, got device ", src.device());
  TORCH_CHECK(src.dim() == 2, op, ": src must be 2-D [S, d], got shape ", src.sizes());
  check_float_dtype(src, op, "src");
  TORCH_CHECK(coef.dim() == 1, op, ": coef must be 1-D [E], got shape ", coef.sizes());
  TORCH_CHECK(
      coef.scalar_type() == src.scalar_type(), op, ": coef must have src's dtype ", src.scalar_type(), ", got ",
      coef.scalar_type());
  check_same_device(coef, src, op, "coef");
  TORCH_CHECK(col.dim() == 1, op, ": col must be 1-D [E], got shape ", col.sizes());
  check_index_dtype(col, op, "col");
  check_same_device(col, src, op, "col");
  TORCH_CHECK(
      col.numel() == coef.numel(), op, ": col and coef must have the same length, got ", col.numel(), " and ",
      coef.numel());
  TORCH_CHECK(num_rows >= 0, op, ": num_rows must be >= 0, got ", num_rows);
  const int64_t num_entries = coef.numel();
  const int64_t d = src.size(1);
  if (row_offsets.has_value()) {
    const at::Tensor& ro = *row_offsets;
    TORCH_CHECK(
        ro.dim() == 1 && ro.size(0) == num_rows + 1, op, ": row_offsets must have shape [num_rows + 1] = [",
        num_rows + 1, "], got ", ro.sizes());
    TORCH_CHECK(ro.scalar_type() == at::kLong, op, ": row_offsets must be int64, got ", ro.scalar_type());
    check_same_device(ro, src, op, "row_offsets");
  } else {
    TORCH_CHECK(
        num_rows > 0 ? num_entries % num_rows == 0 : num_entries == 0, op, ": without row_offsets the ", num_entries,
        " entries must split evenly into num_rows = ", num_rows, " rows");
  }
  if (bias.has_value()) {
    const at::Tensor& b = *bias;
    TORCH_CHECK(b.dim() == 1 && b.size(0) == d, op, ": bias must have shape [d] = [", d, "], got ", b.sizes());
    TORCH_CHECK(
        b.scalar_type() == src.scalar_type(), op, ": bias must have src's dtype ", src.scalar_type(), ", got ",
        b.scalar_type());
    check_same_device(b, src, op, "bias");
  }
  TORCH_CHECK(num_entries == 0 || src.size(0) > 0, op, ": src has no rows but ", num_entries, " entries index it");

  c10::cuda::CUDAGuard device_guard(src.device());
  at::Tensor out = new_output({num_rows, d}, src.options());
  if (num_rows == 0 || d == 0) return out;
  dispatch_types(src.scalar_type(), col.scalar_type(), [&](auto data_tag, auto index_tag) {
    launch_csr_gather_sum<decltype(data_tag), decltype(index_tag)>(coef, col, row_offsets, num_rows, src, bias, out);
  });
  return out;
}

at::Tensor gathered_dot_cuda(const at::Tensor& grad, const at::Tensor& col, const at::Tensor& src) {
  constexpr const char* op = "gathered_dot";
  TORCH_CHECK(grad.is_cuda(), op, ": grad must be a CUDA tensor, got device ", grad.device());
  TORCH_CHECK(grad.dim() == 2, op, ": grad must be 2-D [N, d], got shape ", grad.sizes());
  check_float_dtype(grad, op, "grad");
  TORCH_CHECK(src.dim() == 2, op, ": src must be 2-D [S, d], got shape ", src.sizes());
  TORCH_CHECK(
      src.scalar_type() == grad.scalar_type(), op, ": src must have grad's dtype ", grad.scalar_type(), ", got ",
      src.scalar_type());
  check_same_device(src, grad, op, "src");
  TORCH_CHECK(
      src.size(1) == grad.size(1), op, ": src [S, d] and grad [N, d] must share d, got src ", src.sizes(), " and grad ",
      grad.sizes());
  TORCH_CHECK(col.dim() == 2, op, ": col must be 2-D [N, k], got shape ", col.sizes());
  check_index_dtype(col, op, "col");
  check_same_device(col, grad, op, "col");
  TORCH_CHECK(
      col.size(0) == grad.size(0), op, ": col [N, k] and grad [N, d] must share N, got col ", col.sizes(), " and grad ",
      grad.sizes());
  TORCH_CHECK(col.numel() == 0 || src.size(0) > 0, op, ": src has no rows but col indexes it");

  c10::cuda::CUDAGuard device_guard(grad.device());
  if (col.numel() == 0) return at::empty(col.sizes(), grad.options());
  if (grad.size(1) == 0) return at::zeros(col.sizes(), grad.options());  // empty dot products
  at::Tensor out = new_output(col.sizes(), grad.options());
  dispatch_types(grad.scalar_type(), col.scalar_type(), [&](auto data_tag, auto index_tag) {
    launch_gathered_dot<decltype(data_tag), decltype(index_tag)>(grad, col, src, out);
  });
  return out;
}

}  // namespace
}  // namespace sae_fast

TORCH_LIBRARY_IMPL(sae_fast, CUDA, m) {
  m.impl("csr_gather_sum", &sae_fast::csr_gather_sum_cuda);
  m.impl("gathered_dot", &sae_fast::gathered_dot_cuda);
}
