#!/usr/bin/env python3
"""Reference bytes for ggml's block quantizers (src/gguf/quants.rs).

usage: ggml_quants_reference.py IN.f32 OUT_DIR TYPE... [--n-per-row N]

IN.f32 holds raw little-endian f32 values, rows of N elements (default 256; N a multiple of
every TYPE's block size). TYPE is a ggml type name: F32 F16 BF16 Q8_0 Q4_0 Q5_0 Q5_1 Q4_K Q5_K Q6_K ...

Writes into OUT_DIR, for each TYPE:
  TYPE.ggml      the bytes of real ggml: libggml-base (llama.cpp's, from the llama-cpp-py-sync
                 wheel) through ctypes, `ggml_quantize_chunk(type, src, dst, 0, nrows, N, NULL)`,
                 which is what llama-quantize calls without an importance matrix; checked equal
                 to the per-row functions (`quantize_row_<type>_ref`, `ggml_fp32_to_fp16_row`,
                 `ggml_fp32_to_bf16_row` and `_ref`) where ggml has one
  TYPE.gguf-py   the bytes of the gguf package's `gguf.quants.quantize`, where it implements
                 TYPE (it does F32, F16, BF16, Q8_0, Q4_0, Q5_0, Q5_1, ...; not the K-quants)
  TYPE.deq.f32   `gguf.quants.dequantize` of TYPE.ggml, raw f32
and prints one JSON line: {TYPE: {"bytes": n, "gguf_py": bool, "row_fn": name or null}}.

The wheel's libggml-base needs glibc 2.38 for its `__isoc23_*` imports; on an older glibc,
scripts/setup.sh rebinds them to the classic functions (the quantization code is untouched).

Needs: numpy, gguf, llama-cpp-py-sync (its libggml-base.so.0).
"""
import argparse
import ctypes
import glob
import importlib.util
import json
import os
import sys

import numpy as np


def load_ggml_base():
    spec = importlib.util.find_spec("llama_cpp_py_sync")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llama_cpp_py_sync is not installed (pip install llama-cpp-py-sync)")
    pkg = list(spec.submodule_search_locations)[0]
    libs = sorted(glob.glob(os.path.join(pkg, "libggml-base.so*")))
    if not libs:
        sys.exit(f"no libggml-base.so in {pkg}")
    lib = ctypes.CDLL(libs[0])  # on glibc < 2.38, after scripts/setup.sh rebinds its C23 imports
    f32p, voidp, i64 = ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, f32p, voidp, i64, i64, i64, f32p]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, i64]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    return lib


def row_fn_names(name):
    if name == "F16":
        return ["ggml_fp32_to_fp16_row"]
    if name == "BF16":
        return ["ggml_fp32_to_bf16_row", "ggml_fp32_to_bf16_row_ref"]
    if name == "F32":
        return []
    return [f"quantize_row_{name.lower()[:-2] + name[-2:] if name.endswith('_K') else name.lower()}_ref"]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("input")
    ap.add_argument("out_dir")
    ap.add_argument("types", nargs="+")
    ap.add_argument("--n-per-row", type=int, default=256)
    a = ap.parse_args()

    from gguf import GGMLQuantizationType, quants
    from gguf.constants import GGML_QUANT_SIZES

    lib = load_ggml_base()
    x = np.fromfile(a.input, dtype="<f4")
    n = a.n_per_row
    if x.size % n:
        sys.exit(f"{x.size} values are not whole rows of {n}")
    nrows = x.size // n
    x = np.ascontiguousarray(x.reshape(nrows, n), dtype=np.float32)
    src = x.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    os.makedirs(a.out_dir, exist_ok=True)

    summary = {}
    for name in a.types:
        qt = GGMLQuantizationType[name]
        block, type_size = GGML_QUANT_SIZES[qt]
        if n % block:
            sys.exit(f"{name}: rows of {n} are not whole blocks of {block}")
        if lib.ggml_quantize_requires_imatrix(int(qt)):
            sys.exit(f"{name} needs an importance matrix")
        row_size = lib.ggml_row_size(int(qt), n)
        assert row_size == n // block * type_size, (name, row_size)

        # real ggml, whole tensor, as llama-quantize calls it
        dst = np.zeros(nrows * row_size, dtype=np.uint8)
        got = lib.ggml_quantize_chunk(int(qt), src, dst.ctypes.data_as(ctypes.c_void_p), 0, nrows, n, None)
        assert got == dst.size, (name, got, dst.size)
        dst.tofile(os.path.join(a.out_dir, f"{name}.ggml"))

        # the same through the per-row functions
        used = None
        for fn_name in row_fn_names(name):
            fn = getattr(lib, fn_name)
            fn.restype = None
            fn.argtypes = [ctypes.POINTER(ctypes.c_float), ctypes.c_void_p, ctypes.c_int64]
            rows = np.zeros_like(dst)
            for r in range(nrows):
                fn(x[r].ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows[r * row_size:].ctypes.data_as(ctypes.c_void_p), n)
            if not np.array_equal(rows, dst):
                bad = int(np.argmax(rows != dst))
                sys.exit(f"{name}: {fn_name} differs from ggml_quantize_chunk at byte {bad}")
            used = fn_name

        # the gguf package, where it implements the type
        has_py = True
        try:
            py = quants.quantize(x, qt)
        except NotImplementedError:
            has_py = False
        if has_py:
            np.ascontiguousarray(py).view(np.uint8).tofile(os.path.join(a.out_dir, f"{name}.gguf-py"))

        deq = quants.dequantize(dst.reshape(nrows, row_size), qt)
        np.ascontiguousarray(deq, dtype=np.float32).tofile(os.path.join(a.out_dir, f"{name}.deq.f32"))
        summary[name] = {"bytes": int(dst.size), "gguf_py": has_py, "row_fn": used}
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
