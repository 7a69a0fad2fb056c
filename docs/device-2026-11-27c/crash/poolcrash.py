"""Which CUDA max_pool2x2 bad inputs crash, each in its own process (torch 2.11 on the device)."""
import subprocess
import sys

CASES = {
    "cpu_w1": "torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 4, 1))",
    "cpu_h1": "torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 1, 4))",
    "cpu_2d": "torch.ops.ffablate.max_pool2x2.default(torch.randn(4, 4))",
    "cpu_bwd_shape": "torch.ops.ffablate.max_pool2x2_backward.default(torch.randn(1,1,2,2), torch.zeros(1,1,2,2,dtype=torch.uint8), 6, 4)",
    "cuda_int": "torch.ops.ffablate.max_pool2x2.default(torch.ones(1, 1, 4, 4, dtype=torch.int32, device='cuda'))",
    "cuda_w1": "torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 4, 1, device='cuda'))",
    "cuda_h1": "torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 1, 4, device='cuda'))",
    "cuda_2d": "torch.ops.ffablate.max_pool2x2.default(torch.randn(4, 4, device='cuda'))",
    "cuda_w1_redispatch": "torch.ops.ffablate.max_pool2x2.default.redispatch(torch._C.DispatchKeySet('CUDA'), torch.randn(1, 1, 4, 1, device='cuda'), False)",
    "cuda_w1_nograd": "torch.set_grad_enabled(False); torch.ops.ffablate.max_pool2x2.default(torch.randn(1, 1, 4, 1, device='cuda'))",
    "cuda_bwd_dev": "torch.ops.ffablate.max_pool2x2_backward.default(torch.randn(1,1,2,2,device='cuda'), torch.zeros(1,1,2,2,dtype=torch.uint8), 4, 4)",
    "cuda_bwd_shape": "torch.ops.ffablate.max_pool2x2_backward.default(torch.randn(1,1,2,2,device='cuda'), torch.zeros(1,1,2,3,dtype=torch.uint8,device='cuda'), 4, 4)",
    "cuda_bwd_gives": "torch.ops.ffablate.max_pool2x2_backward.default(torch.randn(1,1,2,2,device='cuda'), torch.zeros(1,1,2,2,dtype=torch.uint8,device='cuda'), 6, 4)",
    "cuda_gn_shape": "torch.ops.ffablate.goodness_norm.default(torch.randn(2, device='cuda'), 1e-6)",
    "cuda_gn_empty": "torch.ops.ffablate.goodness_norm.default(torch.randn(0, 4, device='cuda'), 1e-6)",
}
PRE = "import torch, ffablate.ops\ntry:\n    {}\nexcept RuntimeError as e:\n    print('RuntimeError:', str(e).splitlines()[0])\n"
for name, code in CASES.items():
    p = subprocess.run([sys.executable, "-c", PRE.format(code)], capture_output=True, text=True)
    print(f"{name:<20} rc={p.returncode} {p.stdout.strip()[:160]} {p.stderr.strip()[-200:] if p.returncode else ''}")
    sys.stdout.flush()
