"""Small calls of every CUDA-extension kernel path, for compute-sanitizer (memcheck,
racecheck): vector and scalar paths, uniform and CSR rows with empty rows, strided and
transposed sources, every dtype. Run with PYTORCH_NO_CUDA_MEMORY_CACHING=1 so the
sanitizer sees each allocation's true bounds."""

import torch

import sae_fast

assert sae_fast.cuda_extension_available(), "build the extension first"
ops = torch.ops.sae_fast
dev = "cuda"
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    for n, k, m, d in ((37, 5, 50, 2304), (9, 3, 11, 1025), (5, 1, 3, 7), (3, 70, 40, 12000)):
        values = torch.randn(n, k, device=dev, dtype=dtype)
        indices = torch.randint(0, m, (n, k), device=dev)
        for W in (torch.randn(m, d, device=dev, dtype=dtype), torch.randn(d, m, device=dev, dtype=dtype).t()):
            bias = torch.randn(d, device=dev, dtype=dtype)
            out = ops.csr_gather_sum(values.reshape(-1), indices.reshape(-1), None, n, W, bias)
            grad = torch.randn(n, d, device=dev, dtype=dtype)
            ops.gathered_dot(grad, indices, W)
            ops.gathered_dot(grad.t().contiguous().t(), indices.int(), W)
            offsets = torch.tensor([0, 0, n * k // 2, n * k // 2, n * k], device=dev)
            ops.csr_gather_sum(values.reshape(-1), torch.randint(0, n, (n * k,), device=dev), offsets, 4, grad, None)
            v = values.clone().requires_grad_()
            Wg = W.detach().clone().requires_grad_()
            sae_fast.sparse_decode(v, indices, Wg, bias, backend="cuda").backward(grad)
# The vertical-slash index converter: unsorted lists with padding and duplicates, short
# sequences (seq_lens < context), block sizes that do not divide the context.
from sae_fast.ops.attention_index import vertical_slash_index

for ctx, bm, bn, nv, ns in ((1000, 64, 64, 37, 11), (257, 64, 32, 5, 300), (64, 128, 64, 1, 1)):
    vertical = torch.randint(-3, ctx, (2, 3, nv), device=dev, dtype=torch.int32)
    slash = torch.randint(-3, ctx, (2, 3, ns), device=dev, dtype=torch.int64)
    seq_lens = torch.tensor([ctx, max(1, ctx // 3)], device=dev)
    vertical_slash_index(vertical, slash, seq_lens, bm, bn, backend="cuda")
torch.cuda.synchronize()
print("sanitizer driver: all kernel paths ran")
