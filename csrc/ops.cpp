// Schemas of the sae_fast CUDA-extension ops and the (empty) Python module sae_fast._C.
// Kernels are registered per backend elsewhere: CUDA in the .cu files, CPU (the torch
// reference) and fake kernels in sae_fast/ops/cuda_registrations.py.

#include <Python.h>  // first, as Python requires

#include <torch/library.h>

// The only TORCH_LIBRARY block of the namespace in C++: later op families add m.def lines here.
TORCH_LIBRARY(sae_fast, m) {
  // Python fake kernels must live in this module (torch checks it in register_fake).
  m.set_python_module("sae_fast.ops.cuda_registrations");

  // out[r] = sum_{e in row r} coef[e] * src[col[e]] (+ bias). Rows are CSR segments given by
  // row_offsets [num_rows + 1], or, when it is None, num_rows equal runs of E / num_rows entries.
  m.def(
      "csr_gather_sum(Tensor coef, Tensor col, Tensor? row_offsets, SymInt num_rows, Tensor src, "
      "Tensor? bias) -> Tensor");
  // out[n, j] = <grad[n], src[col[n, j]]>
  m.def("gathered_dot(Tensor grad, Tensor col, Tensor src) -> Tensor");
  // Vertical-slash sparse attention pattern -> per query block: key ranges (block_count,
  // block_offset) and single key columns (column_count, column_index); all int32. The format
  // is specified in sae_fast/ops/attention_index.py.
  m.def(
      "convert_vertical_slash_index(Tensor vertical_idx, Tensor slash_idx, Tensor seq_lens, SymInt context_len, "
      "int block_m, int block_n) -> (Tensor, Tensor, Tensor, Tensor)");
}

// A plain module (no pybind11): importing it runs the registrations above and in the .cu files.
#define SAE_FAST_STR_(x) #x
#define SAE_FAST_STR(x) SAE_FAST_STR_(x)
#define SAE_FAST_CONCAT_(a, b) a##b
#define SAE_FAST_CONCAT(a, b) SAE_FAST_CONCAT_(a, b)

static struct PyModuleDef sae_fast_module_def = {
    PyModuleDef_HEAD_INIT,
    SAE_FAST_STR(TORCH_EXTENSION_NAME),
    "Registers the sae_fast CUDA operators with torch (torch.ops.sae_fast).",
    -1,
    nullptr,
};

PyMODINIT_FUNC SAE_FAST_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  return PyModule_Create(&sae_fast_module_def);
}
