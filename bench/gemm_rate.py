"""bf16 GEMM throughput on this GPU at the shapes of a 7B's layers, for a training step's
8,192 tokens and an evaluation's prefill of 57,344 (256 prompts of 224 tokens): TFLOP/s of
`x @ wᵀ` as libtorch's `linear` runs it (what ftscript's projections call).

usage: python3 bench/gemm_rate.py [--rows 8192,57344]
"""
import argparse, time
import torch


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="8192,57344")
    a = ap.parse_args()
    for m in [int(r) for r in a.rows.split(",")]:
        for name, k, n in [("q/k/v/o", 4096, 4096), ("gate+up", 4096, 22016), ("down", 11008, 4096), ("head", 4096, 32000)]:
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
            torch.nn.functional.linear(x, w)
            torch.cuda.synchronize()
            reps = 10
            t0 = time.perf_counter()
            for _ in range(reps):
                torch.nn.functional.linear(x, w)
            torch.cuda.synchronize()
            dt = (time.perf_counter() - t0) / reps
            print(f"{m:6d} rows {name:8s} {k}->{n}: {dt * 1000:7.2f} ms, {2 * m * k * n / dt / 1e12:6.0f} TFLOP/s", flush=True)
            del x, w


if __name__ == "__main__":
    main()
