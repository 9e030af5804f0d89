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

The wheel's libggml-base needs glibc 2.38 for one import, `__isoc23_strtol`; on an older glibc
a private copy with that import rebound to plain `strtol` is loaded (see patch_for_old_glibc;
the quantization code is untouched).

Needs: numpy, gguf, llama-cpp-py-sync (its libggml-base.so.0).
"""
import argparse
import ctypes
import glob
import importlib.util
import json
import os
import shutil
import struct
import sys
import tempfile

import numpy as np


def elf_hash(name):
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        if g:
            h ^= g >> 24
        h &= ~g & 0xFFFFFFFF
    return h


def patch_for_old_glibc(src, dst):
    """Copies the shared library `src` to `dst`, rebinding its `__isoc23_*` imports (glibc 2.38's
    C23 strtol & co., which differ from the plain functions only in accepting "0b" prefixes; ggml
    uses strtol for environment variables, never in quantization) to the plain functions of
    GLIBC_2.2.5, so that it loads with an older glibc. Nothing else in the file changes."""
    data = bytearray(open(src, "rb").read())
    u16 = lambda o: struct.unpack_from("<H", data, o)[0]
    u32 = lambda o: struct.unpack_from("<I", data, o)[0]
    u64 = lambda o: struct.unpack_from("<Q", data, o)[0]
    assert data[:4] == b"\x7fELF" and data[4] == 2 and data[5] == 1, "not a little-endian ELF64 file"
    shoff, shentsize, shnum = u64(0x28), u16(0x3A), u16(0x3C)
    sections = []
    for i in range(shnum):
        o = shoff + i * shentsize
        sections.append(dict(type=u32(o + 4), offset=u64(o + 0x18), size=u64(o + 0x20), link=u32(o + 0x28)))
    by_type = lambda t: next(s for s in sections if s["type"] == t)
    dynsym, versym, verneed = by_type(11), by_type(0x6FFFFFFF), by_type(0x6FFFFFFE)
    dynstr = sections[dynsym["link"]]["offset"]
    cstr = lambda off: bytes(data[dynstr + off:data.index(0, dynstr + off)])

    have = tuple(int(v) for v in os.confstr("CS_GNU_LIBC_VERSION").split()[1].split(".")[:2])
    too_new, base = {}, None  # vna_other -> vernaux offset; GLIBC_2.2.5's (name offset, index)
    o = verneed["offset"]
    while True:
        cnt, file_, aux, nxt = u16(o + 2), cstr(u32(o + 4)), u32(o + 8), u32(o + 12)
        a = o + aux
        for _ in range(cnt):
            name = cstr(u32(a + 8))
            if file_ == b"libc.so.6" and name.startswith(b"GLIBC_"):
                ver = tuple(int(v) for v in name[6:].split(b".")[:2])
                if name == b"GLIBC_2.2.5":
                    base = (u32(a + 8), u16(a + 6))
                elif ver > have:
                    too_new[u16(a + 6)] = a
            a += u32(a + 12)
        if not nxt:
            break
        o += nxt
    assert base is not None, "no GLIBC_2.2.5 requirement to rebind to"
    for i in range(dynsym["size"] // 24):
        idx = u16(versym["offset"] + 2 * i) & 0x7FFF
        if idx in too_new:
            s = dynsym["offset"] + 24 * i
            name = cstr(u32(s))
            if not name.startswith(b"__isoc23_"):
                raise SystemExit(f"{src} needs {name.decode()} of a newer glibc")
            struct.pack_into("<I", data, s, u32(s) + len(b"__isoc23_"))  # the plain name is its suffix
            struct.pack_into("<H", data, versym["offset"] + 2 * i, base[1])
    for a in too_new.values():  # the requirement becomes a duplicate of GLIBC_2.2.5's
        struct.pack_into("<I", data, a, elf_hash(b"GLIBC_2.2.5"))
        struct.pack_into("<I", data, a + 8, base[0])
    open(dst, "wb").write(data)


def load_ggml_base():
    spec = importlib.util.find_spec("llama_cpp_py_sync")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("llama_cpp_py_sync is not installed (pip install llama-cpp-py-sync)")
    pkg = list(spec.submodule_search_locations)[0]
    libs = sorted(glob.glob(os.path.join(pkg, "libggml-base.so*")))
    if not libs:
        sys.exit(f"no libggml-base.so in {pkg}")
    try:
        lib = ctypes.CDLL(libs[0])
    except OSError as e:
        if "GLIBC_" not in str(e):
            raise
        # the wheel is built against glibc 2.38; this system's is older
        tmp = tempfile.mkdtemp(prefix="ggml-base-")
        patched = os.path.join(tmp, os.path.basename(libs[0]))
        patch_for_old_glibc(libs[0], patched)
        print(f"note: {e}; loading a copy with __isoc23_* rebound to glibc 2.2.5", file=sys.stderr)
        lib = ctypes.CDLL(patched)
        shutil.rmtree(tmp)  # mapped already
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
