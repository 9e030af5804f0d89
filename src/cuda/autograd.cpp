// Autograd functions around ftscript's fused CUDA kernels (src/cuda/kernels.cu: SwiGLU and
// rotary embedding, forward and backward), and backward from several roots with given
// gradients. A C boundary for Rust: tensors travel as `at::Tensor*` (what tch's `C_tensor` is),
// new ones come back allocated with `new` (tch frees them); errors come back as text, no C++
// exception crosses the boundary.
#include <ATen/ATen.h>
#include "guarded.h"
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>

#include <cstdint>
#include <cstdio>
#include <string>
#include <vector>

extern "C" int ftscript_rtc_launch(const char* src, int device, const char* name, unsigned grid, unsigned block,
                                   void** params, char* err, size_t err_len);

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// kernels.cu's text, handed over (static, NUL-terminated) by every call from Rust.
const char* kernel_source = nullptr;

// Launches `base`_<dtype of `like`> over `threads` threads on `like`'s GPU.
void launch(const char* base, const at::Tensor& like, long long threads, void** params) {
  if (threads <= 0) return;
  std::string name = base;
  switch (like.scalar_type()) {
    case at::kBFloat16: name += "_bf16"; break;
    case at::kHalf: name += "_f16"; break;
    case at::kFloat: name += "_f32"; break;
    default: throw std::runtime_error(name + ": unsupported dtype " + std::string(c10::toString(like.scalar_type())));
  }
  const unsigned block = 256;
  char err[4096] = {0};
  if (ftscript_rtc_launch(kernel_source, like.get_device(), name.c_str(), (unsigned)((threads + block - 1) / block), block,
                          params, err, sizeof err) != 0)
    throw std::runtime_error(err);
}

int aligned16(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) return 0;
  return 1;
}

// silu(gate) · up; saves the two inputs (not the SiLU output, which backward recomputes).
struct SwiGlu : public torch::autograd::Function<SwiGlu> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& gate, const at::Tensor& up) {
    TORCH_CHECK(gate.sizes() == up.sizes() && gate.scalar_type() == up.scalar_type(), "swiglu: gate ", gate.sizes(),
                " and up ", up.sizes(), " differ");
    at::Tensor g = gate.contiguous(), u = up.contiguous(), out = at::empty_like(g);
    long long n = g.numel();
    int vec = aligned16({&g, &u, &out});
    void *pg = g.data_ptr(), *pu = u.data_ptr(), *po = out.data_ptr();
    void* params[] = {&pg, &pu, &po, &n, &vec};
    launch("swiglu_fwd", g, (n + 7) / 8, params);
    ctx->save_for_backward({g, u});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    return gradients(grads[0], saved[0], saved[1], false);
  }
  // (∂L/∂gate, ∂L/∂up) from ∂L/∂out, into new tensors or over `gate` and `up` (contiguous).
  static variable_list gradients(const at::Tensor& dout, const at::Tensor& gate, const at::Tensor& up, bool in_place) {
    TORCH_CHECK(dout.sizes() == gate.sizes() && gate.sizes() == up.sizes() && dout.scalar_type() == gate.scalar_type() &&
                    gate.scalar_type() == up.scalar_type(),
                "swiglu backward: shapes or dtypes differ");
    at::Tensor dy = dout.contiguous(), g = gate.contiguous(), u = up.contiguous();
    TORCH_CHECK(!in_place || (gate.is_contiguous() && up.is_contiguous()), "swiglu backward in place: not contiguous");
    at::Tensor dg = in_place ? g : at::empty_like(g), du = in_place ? u : at::empty_like(u);
    long long n = g.numel();
    int vec = aligned16({&dy, &g, &u, &dg, &du});
    void *pd = dy.data_ptr(), *pg = g.data_ptr(), *pu = u.data_ptr(), *pdg = dg.data_ptr(), *pdu = du.data_ptr();
    void* params[] = {&pd, &pg, &pu, &pdg, &pdu, &n, &vec};
    launch("swiglu_bwd", g, (n + 7) / 8, params);
    return {dg, du};
  }
};

// Rotary embedding of x [B, T, heads, D] by cos, sin [B, T, D]; saves only cos and sin.
struct Rope : public torch::autograd::Function<Rope> {
  static void run(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& out, float sign) {
    TORCH_CHECK(x.numel() / 2 < (1LL << 32), "rope: tensor too large");
    int heads = (int)x.size(2), dim = (int)x.size(3);
    int vec = (dim / 2) % 8 == 0 ? aligned16({&x, &cos, &sin, &out}) : 0;
    unsigned int groups = (unsigned int)(x.numel() / 2 / (vec ? 8 : 1));
    void *px = x.data_ptr(), *pc = cos.data_ptr(), *ps = sin.data_ptr(), *po = out.data_ptr();
    void* params[] = {&px, &pc, &ps, &po, &groups, &heads, &dim, &sign, &vec};
    launch("rope", x, groups, params);
  }
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
    TORCH_CHECK(x.dim() == 4 && cos.dim() == 3 && cos.sizes() == sin.sizes() && x.size(0) == cos.size(0) &&
                    x.size(1) == cos.size(1) && x.size(3) == cos.size(2) && x.size(3) % 2 == 0 &&
                    x.scalar_type() == cos.scalar_type() && x.scalar_type() == sin.scalar_type(),
                "rope: x ", x.sizes(), " (", x.scalar_type(), ") does not fit cos/sin ", cos.sizes(), " (",
                cos.scalar_type(), ")");
    at::Tensor xc = x.contiguous(), c = cos.contiguous(), s = sin.contiguous(), out = at::empty_like(xc);
    run(xc, c, s, out, 1.0f);
    ctx->save_for_backward({c, s});
    return out;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    at::Tensor dy = grads[0].contiguous(), dx = at::empty_like(dy);
    run(dy, saved[0], saved[1], dx, -1.0f);
    return {dx, at::Tensor(), at::Tensor()};
  }
};
}  // namespace

extern "C" int ftscript_swiglu(const char* src, const at::Tensor* gate, const at::Tensor* up, at::Tensor** out,
                               char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    *out = new at::Tensor(SwiGlu::apply(*gate, *up));
  });
}

extern "C" int ftscript_swiglu_backward_(const char* src, const at::Tensor* dout, const at::Tensor* gate,
                                         const at::Tensor* up, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    SwiGlu::gradients(*dout, *gate, *up, true);
  });
}

extern "C" int ftscript_rope(const char* src, const at::Tensor* x, const at::Tensor* cos, const at::Tensor* sin,
                             at::Tensor** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    *out = new at::Tensor(Rope::apply(*x, *cos, *sin));
  });
}

// Accumulates into the leaves' `.grad` the gradient of Σᵢ ⟨roots[i], grads[i]⟩.
extern "C" int ftscript_backward(const at::Tensor* const* roots, const at::Tensor* const* grads, int n, char* err,
                                 size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    std::vector<at::Tensor> r, g;
    for (int i = 0; i < n; i++) {
      r.push_back(*roots[i]);
      g.push_back(*grads[i]);
    }
    torch::autograd::backward(r, g);
  });
}
