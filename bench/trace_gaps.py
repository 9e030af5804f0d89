"""Where the GPU waited, from a profile's Chrome trace (`train`'s `profile` option writes
`<output_dir>/profile/trace.json`).

usage: python3 bench/trace_gaps.py TRACE [--min-ms 0.5] [--top 15] [--timeline MS] [--ops N]

Prints the GPU's busy time over the traced span, its idle time in gaps of at least `--min-ms`,
and the longest such gaps, each with the kernels on either side and the host work that
overlapped it most (CPU ops and CUDA runtime calls: a synchronization, a graph's capture, the
tokenizer...). A gap is time when no kernel, copy or memset ran on any stream. `--timeline MS`
also prints, for each MS-long window of the span, the GPU's busy time and its three costliest
kernels there (a prefill, a run of decoding steps and a training step look different).
`--ops N` prints the N host ops (by name and input shapes) whose kernels took the most GPU time,
with their count and achieved TFLOP/s where the op is a matrix product.
"""
import argparse, json

GPU = {"kernel", "gpu_memcpy", "gpu_memset"}
HOST = {"cpu_op", "cuda_runtime", "cuda_driver", "user_annotation", "python_function"}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("trace")
    ap.add_argument("--min-ms", type=float, default=0.5)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--timeline", type=float, default=None)
    ap.add_argument("--ops", type=int, default=0)
    a = ap.parse_args()
    events = json.load(open(a.trace))["traceEvents"]
    timed = [e for e in events if e.get("ph") == "X" and "ts" in e and "dur" in e]
    gpu = sorted((e for e in timed if e.get("cat") in GPU), key=lambda e: e["ts"])
    host = [e for e in timed if e.get("cat") in HOST]
    if not gpu:
        raise SystemExit("no GPU activity in the trace")
    start, end = gpu[0]["ts"], max(e["ts"] + e["dur"] for e in gpu)
    # merge the GPU's intervals over all streams; the holes between them are the gaps
    gaps, busy, reach, before = [], 0.0, gpu[0]["ts"], gpu[0]
    for e in gpu:
        if e["ts"] > reach:
            gaps.append((e["ts"] - reach, reach, before, e))
        if e["ts"] + e["dur"] > reach:
            busy += e["ts"] + e["dur"] - max(reach, e["ts"])
            reach, before = e["ts"] + e["dur"], e
    span = end - start
    long = [g for g in gaps if g[0] >= a.min_ms * 1000]
    print(f"traced GPU span {span / 1000:.1f} ms: busy {busy / 1000:.1f} ms ({busy / span:.0%}), "
          f"idle {(span - busy) / 1000:.1f} ms, of which {sum(g[0] for g in long) / 1000:.1f} ms in {len(long)} gaps of >= {a.min_ms} ms")
    for length, at, left, right in sorted(long, key=lambda g: -g[0])[:a.top]:
        lo, hi = at, at + length
        overlap = sorted(((min(hi, h["ts"] + h["dur"]) - max(lo, h["ts"]), h["name"]) for h in host
                          if h["ts"] < hi and h["ts"] + h["dur"] > lo), reverse=True)
        seen, names = set(), []
        for ms, name in overlap:
            if name not in seen:
                seen.add(name)
                names.append(f"{name[:60]} {ms / 1000:.1f}")
            if len(names) == 4:
                break
        print(f"{length / 1000:8.2f} ms at +{(at - start) / 1000:.0f} ms after {left['name'][:40]!r} before {right['name'][:40]!r}; host: {'; '.join(names)}")

    if a.timeline:
        width = a.timeline * 1000
        windows = {}
        for e in gpu:
            w = windows.setdefault(int((e["ts"] - start) // width), {})
            w[e["name"]] = w.get(e["name"], 0.0) + e["dur"]
        for i in sorted(windows):
            w = windows[i]
            top = sorted(w.items(), key=lambda kv: -kv[1])[:3]
            print(f"+{i * a.timeline:7.0f} ms: busy {sum(w.values()) / 1000:6.1f} ms; "
                  + "; ".join(f"{n[:44]} {d / 1000:.1f}" for n, d in top))

    if a.ops:
        by_ops(host, gpu, a.ops)


def by_ops(host, gpu, top):
    """GPU time by launching op and its input shapes: a kernel's "External id" names the
    innermost host op it was launched from."""
    ops = {e["args"]["External id"]: e for e in host if e.get("cat") == "cpu_op" and "External id" in e.get("args", {})}
    totals = {}
    for k in gpu:
        op = ops.get(k.get("args", {}).get("External id"))
        # a kernel launched outside any op (ftscript's own, from C++) counts under its name
        key = (op["name"], json.dumps(op["args"].get("Input Dims", []))) if op else (f"(no op) {k['name'][:40]}", "[]")
        t = totals.setdefault(key, [0.0, set(), set()])
        t[0] += k["dur"]
        t[1].add(op["args"]["External id"] if op else (k["ts"], k["name"]))
        t[2].add(k["name"][:40])
    for (name, dims), (us, calls, kernels) in sorted(totals.items(), key=lambda kv: -kv[1][0])[:top]:
        d = json.loads(dims)
        rate = ""
        if name in ("aten::mm", "aten::addmm") and len(d) >= 2:
            x, w = d[-2], d[-1]
            if len(x) == 2 and len(w) == 2:
                rate = f", {2 * x[0] * x[1] * w[1] * len(calls) / us / 1e6:.0f} TFLOP/s"
        print(f"{us / 1000:9.1f} ms {len(calls):5d}x {name} {dims[:90]}{rate}; {', '.join(sorted(kernels))[:90]}")


if __name__ == "__main__":
    main()
