"""What a new sequence length costs libtorch's attention kernels on this GPU: causal SDPA forward
+ backward (bf16, batch 4, 32 heads of 128) by cuDNN's kernel and by FlashAttention-2, the first
call at each length (cuDNN builds an execution plan for each new shape) and the steady state.

usage: python3 bench/sdpa_plans.py [--lengths 2048,1500,1501,777] [--masked]
  --masked also times a forward with a bool mask (left padding) at batch 256, as a prefill
"""
import argparse, time
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
import torch.nn.functional as F


def timed(fn):
    torch.cuda.synchronize(); t0 = time.perf_counter(); fn(); torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1000


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--lengths", default="2048,1500,1501,777")
    ap.add_argument("--masked", action="store_true")
    a = ap.parse_args()
    for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("flash", SDPBackend.FLASH_ATTENTION)]:
        for t in [int(x) for x in a.lengths.split(",")]:
            q, k, v = (torch.randn(4, 32, t, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

            def step():
                with sdpa_kernel(backend):
                    F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()
            first = timed(step)
            steady = min(timed(step) for _ in range(5))
            print(f"{name:6s} causal fwd+bwd T={t:5d}: first call {first:8.1f} ms, then {steady:6.2f} ms", flush=True)
    if a.masked:
        for name, backend in [("cudnn", SDPBackend.CUDNN_ATTENTION), ("memeff", SDPBackend.EFFICIENT_ATTENTION)]:
            for t in [224, 231]:
                q, k, v = (torch.randn(256, 32, t, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                valid = torch.ones(256, t, dtype=torch.bool, device="cuda"); valid[::2, :7] = False
                mask = (torch.ones(t, t, dtype=torch.bool, device="cuda").tril() & valid[:, None, :]) | torch.eye(t, dtype=torch.bool, device="cuda")
                mask = mask[:, None]

                def fwd():
                    with torch.no_grad(), sdpa_kernel(backend):
                        F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
                first = timed(fwd)
                steady = min(timed(fwd) for _ in range(5))
                print(f"{name:6s} masked fwd B=256 T={t}: first call {first:8.1f} ms, then {steady:6.2f} ms", flush=True)


if __name__ == "__main__":
    main()
