"""bitsandbytes' own 4-bit quantization of test matrices, for tests/quant.rs.

usage: bnb_reference.py OUT.safetensors [MODEL_DIR] [--device cuda] [--small]
       bnb_reference.py logits MODEL_DIR nf4|fp4 dq|nodq OUT.safetensors
       bnb_reference.py saved-logits QUANTIZED_DIR OUT.safetensors [--device cuda]
       bnb_reference.py int8 OUT.safetensors [MODEL_DIR]

The second form loads MODEL_DIR in transformers with BitsAndBytesConfig (4-bit, fp32 compute,
on CPU) and writes `logits` [1, 10, V] for the fixed ids in `ids` [1, 10]; the third loads a
directory saved 4-bit (by ftscript's save_quantized) as it is and writes the same (on CPU, or
on the GPU with `--device cuda`, where bitsandbytes runs its CUDA kernels).

Quantizes random matrices (several shapes and dtypes, including sizes that are not multiples
of 64 or 256) and, with MODEL_DIR, a few real weights of that model, with
`bitsandbytes.functional.quantize_4bit(w, blocksize=64, quant_type, compress_statistics)` for
nf4/fp4 with and without double quantization, on the device bitsandbytes runs on here
(`--device cuda` for the GPU machine), and writes, for each case `C` and variant `V`
(`nf4`, `nf4_dq`, `fp4`, `fp4_dq`):

  C.input               the matrix (its own dtype)
  C.V.packed            uint8 [(n+1)/2, 1]
  C.V.absmax            fp32 [blocks] (uint8 with double quant)
  C.V.quant_map         fp32 [16]
  C.V.nested_absmax     fp32, C.V.nested_quant_map fp32 [256], C.V.offset fp32 [1]  (double quant)
  C.V.dequant           dequantize_4bit(...) in the matrix's dtype
and metadata entries `device` (cpu or cuda) and `dequant_path` (see below).

Pinned CPU paths. bitsandbytes 0.50's CPU backend changes path with the CPU's features:
- its native `dequantize_4bit` / `dequantize_blockwise` kernels take an AVX512F branch where the CPU
  has it, which gives FP4 code 8 as +0 instead of -0 and misplaces values whose 64-blocks straddle
  rows (128×96 differs by ~3e-2); the quantization (`quantize_4bit`) is portable torch code;
- `Linear4bit` repacks its weight and multiplies through another kernel (bf16, or one fetched from
  the Hub by the `kernels` package) on CPUs with AVX512-BF16.
So on the CPU every dequantization here goes through bitsandbytes' portable torch implementation
(its `default` backend's code, run eagerly, which every CPU runs the same way, registered below
as the CPU kernels of bitsandbytes' dequantize ops), `Linear4bit` is kept off the
AVX512-BF16 path, and `kernels` cannot be imported (no network). The portable path gives FP4
code 8 as +0; bitsandbytes' native and CUDA kernels give -0 (tests/quant.rs checks that sign
against the CUDA fixture).
"""
import sys
import warnings

sys.modules["kernels"] = None  # bitsandbytes would fetch a CPU GEMM from the Hub through it

import torch
import bitsandbytes
import bitsandbytes.functional as F
from bitsandbytes.backends.default import ops as portable
from bitsandbytes.backends.utils import _get_4bit_code
from safetensors import safe_open
from safetensors.torch import save_file

# bitsandbytes torch.compiles these; the eager originals (`__wrapped__`) are used, since inductor
# generates code for the CPU it finds (and crashed under ATEN_CPU_CAPABILITY=avx2 here)
_dequantize_4bit_eager = portable._dequantize_4bit_compute.__wrapped__
_dequantize_blockwise_eager = portable._dequantize_blockwise_compute.__wrapped__


def _dequantize_4bit_portable(A, absmax, blocksize, quant_type, shape, dtype):
    q = A.view(torch.uint8).reshape(-1)
    return _dequantize_4bit_eager(q, absmax.float(), _get_4bit_code(quant_type, q.device), blocksize, shape, dtype)


def _dequantize_blockwise_portable(A, absmax, code, blocksize, dtype):
    return _dequantize_blockwise_eager(A.reshape(-1), absmax, code, blocksize, dtype).reshape(A.shape)


# bitsandbytes' ops on CPU tensors (F.dequantize_4bit, the nested absmax, Linear4bit's GEMM) now
# dequantize through its portable code
_pinned = torch.library.Library("bitsandbytes", "IMPL")
with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # "Overriding a previously registered kernel": that is the point
    _pinned.impl("dequantize_4bit", _dequantize_4bit_portable, "CPU", allow_override=True)
    _pinned.impl("dequantize_blockwise", _dequantize_blockwise_portable, "CPU", allow_override=True)


def pin_portable_cpu_path(model):
    """Keeps transformers' `Linear4bit` layers on bitsandbytes' portable CPU path (see above)."""
    layers = [m for m in model.modules() if isinstance(m, bitsandbytes.nn.Linear4bit)]
    assert layers, "no Linear4bit layers"
    for m in layers:
        m.support_avx512bf16_for_cpu = False
    return layers


def check_portable(layers):
    """Fails if any layer took the repacked AVX512-BF16 path after all."""
    packed = [m for m in layers if getattr(m.weight.quant_state, "packing_format_for_cpu", False)]
    assert not packed, f"{len(packed)} Linear4bit layers were repacked for the AVX512-BF16 path"


def cases(model_dir, small=False):
    g = torch.Generator().manual_seed(1234)
    out = {}
    shapes = [(64, 64), (128, 96), (100, 70), (33, 7), (257, 129), (1000, 300), (5,), (576, 576)]
    if small:  # a fixture small enough to commit
        shapes = [(64, 64), (100, 70), (33, 7), (257, 129), (5,)]
    for shape in shapes:
        for dt, name in [(torch.float32, "f32"), (torch.bfloat16, "bf16"), (torch.float16, "f16")]:
            w = (torch.randn(*shape, generator=g) * 0.02).to(dt)
            out[f"rand_{'x'.join(map(str, shape))}_{name}"] = w
    # outliers and exact zeros
    w = torch.randn(300, 64, generator=g) * 0.02
    w[::7] *= 40
    w[5] = 0
    w[:, 3] = 0
    out["outliers_f32"] = w
    if model_dir:
        with safe_open(f"{model_dir}/model.safetensors", "pt") as f:
            names = ["model.layers.0.self_attn.q_proj.weight", "model.layers.3.self_attn.k_proj.weight",
                     "model.layers.7.mlp.down_proj.weight", "model.layers.29.mlp.gate_proj.weight"]
            for name in names[1:2] if small else names:
                t = f.get_tensor(name)
                out["demo." + name] = t
                out["demo_bf16." + name] = t.to(torch.bfloat16)
    return out


IDS = [[0, 5, 17, 42, 99, 123, 7, 250, 3, 64]]


def hf_logits(model_dir, qt, dq, out):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    cfg = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=qt, bnb_4bit_use_double_quant=dq == "dq",
                             bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=cfg, device_map="cpu",
                                                 dtype=torch.float32)
    layers = pin_portable_cpu_path(model)
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = model(ids).logits
    check_portable(layers)
    save_file({"ids": ids, "logits": logits.float().contiguous()}, out)


def saved_logits(model_dir, out, *opts):
    """Logits of a model directory saved 4-bit (its config.json carries quantization_config)."""
    device = opts[1] if opts[:1] == ("--device",) else "cpu"
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_dir, device_map=device)
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == "Linear4bit", type(model.model.layers[0].self_attn.q_proj)
    layers = pin_portable_cpu_path(model) if device == "cpu" else []
    ids = torch.tensor(IDS)
    with torch.no_grad():
        logits = model(ids.to(device)).logits.cpu()
    check_portable(layers)
    save_file({"ids": ids, "logits": logits.float().contiguous()}, out)


def int8(out, model_dir=None):
    """bitsandbytes' int8_vectorwise_quant (LLM.int8() weights, threshold 0): C.input, C.CB, C.SCB, C.dequant."""
    tensors = {}
    for case, w in cases(model_dir, small=True).items():
        if w.dim() != 2:
            continue
        cb, scb, _ = F.int8_vectorwise_quant(w.clone())
        tensors[f"{case}.input"] = w.contiguous()
        tensors[f"{case}.CB"] = cb
        tensors[f"{case}.SCB"] = scb
        tensors[f"{case}.dequant"] = F.int8_vectorwise_dequant(cb, scb)
    save_file(tensors, out)


def main():
    args = sys.argv[1:]
    if args[0] == "int8":
        return int8(*args[1:])
    if args[0] == "logits":
        return hf_logits(*args[1:])
    if args[0] == "saved-logits":
        return saved_logits(*args[1:])
    device = "cpu"
    if "--device" in args:
        i = args.index("--device")
        device = args[i + 1]
        del args[i:i + 2]
    small = "--small" in args
    args = [a for a in args if a != "--small"]
    path, model_dir = args[0], (args[1] if len(args) > 1 else None)
    tensors = {}
    for case, w in cases(model_dir, small).items():
        tensors[f"{case}.input"] = w.contiguous()
        for qt in ["nf4", "fp4"]:
            for dq in [False, True]:
                v = f"{case}.{qt}{'_dq' if dq else ''}"
                q, st = F.quantize_4bit(w.to(device), blocksize=64, quant_type=qt, compress_statistics=dq)
                d = F.dequantize_4bit(q, st)
                tensors[f"{v}.packed"] = q.cpu()
                tensors[f"{v}.absmax"] = st.absmax.cpu()
                tensors[f"{v}.quant_map"] = st.code.cpu()
                if dq:
                    tensors[f"{v}.nested_absmax"] = st.state2.absmax.cpu()
                    tensors[f"{v}.nested_quant_map"] = st.state2.code.cpu()
                    tensors[f"{v}.offset"] = st.offset.reshape(1).float().cpu()
                tensors[f"{v}.dequant"] = d.cpu().contiguous()
    save_file({k: v.contiguous() for k, v in tensors.items()}, path, metadata={"device": device, "dequant_path": "cuda" if device != "cpu" else "portable"})


if __name__ == "__main__":
    main()
