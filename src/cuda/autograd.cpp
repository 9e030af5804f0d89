// Autograd functions around ftscript's fused CUDA kernels (src/cuda/kernels.cu: SwiGLU and
// rotary embedding, forward and backward), and backward from several roots with given
// gradients. A C boundary for Rust: tensors travel as `at::Tensor*` (what tch's `C_tensor` is),
// new ones come back allocated with `new` (tch frees them); errors come back as text, no C++
// exception crosses the boundary.
#include <ATen/ATen.h>
#include <ATen/SDPBackend.h>
#include "guarded.h"
#include <torch/csrc/autograd/autograd.h>
#include <torch/csrc/autograd/custom_function.h>
#include "streams.h"
#include <c10/core/StreamGuard.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <optional>
#include <string>
#include <vector>

extern "C" int ftscript_rtc_launch(const char* src, int device, const char* name, unsigned grid, unsigned block,
                                   void** params, int programmatic, char* err, size_t err_len);

namespace {
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// kernels.cu's text, handed over (static, NUL-terminated) by every call from Rust.
const char* kernel_source = nullptr;

// Launches `base`_<dtype of `like`> over `threads` threads, in blocks of `block`, on `like`'s GPU;
// `programmatic` for the kernels that wait for the kernel before them themselves (kernels.cu's
// pdl_wait), which may then start while it finishes.
void launch(const char* base, const at::Tensor& like, long long threads, void** params, unsigned block = 256,
            bool programmatic = false) {
  if (threads <= 0) return;
  std::string name = base;
  switch (like.scalar_type()) {
    case at::kBFloat16: name += "_bf16"; break;
    case at::kHalf: name += "_f16"; break;
    case at::kFloat: name += "_f32"; break;
    default: throw std::runtime_error(name + ": unsupported dtype " + std::string(c10::toString(like.scalar_type())));
  }
  char err[4096] = {0};
  if (ftscript_rtc_launch(kernel_source, like.get_device(), name.c_str(), (unsigned)((threads + block - 1) / block), block,
                          params, programmatic ? 1 : 0, err, sizeof err) != 0)
    throw std::runtime_error(err);
}

int aligned16(std::initializer_list<const at::Tensor*> ts) {
  for (const at::Tensor* t : ts)
    if (reinterpret_cast<uintptr_t>(t->data_ptr()) % 16) return 0;
  return 1;
}

// `t` contiguous, starting on a 16-byte boundary (copied if it must be).
at::Tensor aligned(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  return aligned16({&c}) ? c : c.clone();
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
    // one thread per (position, group of 4 heads, 8 pairs or 1): kernels.cu's ROPE_HEADS
    long long positions = x.size(0) * x.size(1), per_row = dim / 2 / (vec ? 8 : 1);
    unsigned int threads = (unsigned int)(positions * ((heads + 3) / 4) * per_row);
    void *px = x.data_ptr(), *pc = cos.data_ptr(), *ps = sin.data_ptr(), *po = out.data_ptr();
    void* params[] = {&px, &pc, &ps, &po, &threads, &heads, &dim, &sign, &vec};
    launch("rope", x, threads, params);
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

// RMSNorm of `h + delta` by a frozen weight w over the last dimension (a multiple of 8, at most
// 8192): returns (h + delta, norm) — or, without delta (`has_delta` false; pass h), (norm). Backward
// adds the norm's input gradient to the sum's own in the same kernel and hands the total to both
// h and delta, as autograd's add would. Saves the sum and the per-row 1/rms.
struct AddRmsNorm : public torch::autograd::Function<AddRmsNorm> {
  static const unsigned threads = 256;  // kernels.cu's RMS_THREADS
  static variable_list forward(AutogradContext* ctx, const at::Tensor& h, const at::Tensor& delta,
                               const at::Tensor& w, double eps, bool has_delta) {
    const int64_t dim = h.size(-1);
    TORCH_CHECK(dim % 8 == 0 && dim <= 8192 && w.dim() == 1 && w.size(0) == dim && w.scalar_type() == h.scalar_type() &&
                    delta.sizes() == h.sizes() && delta.scalar_type() == h.scalar_type(),
                "add_rms_norm: h ", h.sizes(), ", delta ", delta.sizes(), ", weight ", w.sizes(), " do not fit");
    at::Tensor hc = aligned(h), dc = has_delta ? aligned(delta) : at::Tensor(), wc = aligned(w);
    at::Tensor sum = has_delta ? at::empty_like(hc) : hc, out = at::empty_like(hc);
    const int64_t rows = hc.numel() / dim;
    at::Tensor rstd = at::empty({rows}, hc.options().dtype(at::kFloat));
    void *ph = hc.data_ptr(), *pd = has_delta ? dc.data_ptr() : nullptr, *pw = wc.data_ptr(), *ps = sum.data_ptr(),
         *po = out.data_ptr(), *pr = rstd.data_ptr();
    int d = (int)dim;
    float e = (float)eps;
    long long n = rows;
    void* params[] = {&ph, &pd, &pw, &ps, &po, &pr, &d, &e, &n};
    if (dim <= 256)  // a warp per row
      launch("add_rms_norm_rows", hc, rows * 32, params, 256, true);
    else
      launch("add_rms_norm", hc, rows * threads, params, threads, true);
    ctx->save_for_backward({sum, wc, rstd});
    ctx->saved_data["has_delta"] = has_delta;
    if (has_delta) return {sum, out};
    return {out};
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    const at::Tensor &sum = saved[0], &w = saved[1], &rstd = saved[2];
    const bool has_delta = ctx->saved_data["has_delta"].toBool();
    const at::Tensor& dsum_in = has_delta ? grads[0] : at::Tensor();
    const at::Tensor& dy_in = has_delta ? grads[1] : grads[0];
    at::Tensor dsum = dsum_in.defined() ? aligned(dsum_in) : at::Tensor(), dx;
    if (dy_in.defined()) {
      at::Tensor dy = aligned(dy_in);
      dx = at::empty_like(sum);
      const int64_t dim = sum.size(-1), rows = sum.numel() / dim;
      void *pdy = dy.data_ptr(), *ps = sum.data_ptr(), *pw = w.data_ptr(), *pr = rstd.data_ptr(),
           *pres = dsum.defined() ? dsum.data_ptr() : nullptr, *pdx = dx.data_ptr();
      int d = (int)dim;
      long long n = rows;
      void* params[] = {&pdy, &ps, &pw, &pr, &pres, &pdx, &d, &n};
      if (dim <= 256)  // a warp per row
        launch("rms_norm_bwd_rows", sum, rows * 32, params);
      else if (dim % 256 == 0)  // one 8-element chunk a thread
        launch("rms_norm_bwd1", sum, rows * (dim / 8), params, (unsigned)(dim / 8));
      else
        launch("rms_norm_bwd", sum, rows * threads, params);
    } else {
      dx = dsum;
    }
    return {dx, has_delta ? dx : at::Tensor(), at::Tensor(), at::Tensor(), at::Tensor()};
  }
};

// Set once a kernel launch from a backward failed (no NVRTC, say): the ops do the work from then on.
std::atomic<bool> backward_kernels_failed{false};

// dx += scale · mask ⊙ (u A): one kernel (kernels.cu's `lora_dx`) on a GPU when the rows are
// 16-byte aligned, else the ops (whose u A and masked product round separately).
void masked_accumulate(at::Tensor& dx, const at::Tensor& mask, const at::Tensor& u, const at::Tensor& a, double scale) {
  at::Tensor m = mask.contiguous(), uc = u.contiguous(), ac = a.contiguous();
  long long rows = dx.size(0);
  int dim = (int)dx.size(1), rank = (int)a.size(0);
  if (dx.is_cuda() && dx.is_contiguous() && dim % 8 == 0 && aligned16({&dx, &m, &uc, &ac}) &&
      m.scalar_type() == at::kBool && !backward_kernels_failed) {
    void *pd = dx.data_ptr(), *pm = m.data_ptr(), *pu = uc.data_ptr(), *pa = ac.data_ptr();
    float s = (float)scale;
    void* params[] = {&pd, &pm, &pu, &pa, &rows, &dim, &rank, &s};
    try {
      // kernels.cu's instances: rank 8 (4 rows a thread), 16 (2 rows), any other (4 rows)
      if (rank == 8)
        launch("lora_dx_r8", dx, (rows + 3) / 4 * (dim / 8), params, 128);
      else if (rank == 16)
        launch("lora_dx_r16", dx, (rows + 1) / 2 * (dim / 8), params, 128);
      else
        launch("lora_dx", dx, (rows + 3) / 4 * (dim / 8), params);
      return;
    } catch (const std::exception& e) {
      backward_kernels_failed = true;
      fprintf(stderr, "ftscript: lora_dx kernel unavailable, using libtorch ops instead: %s\n", e.what());
    }
  }
  dx.add_(at::native_dropout_backward(at::mm(u, a), mask, scale));
}

// s · (m1 m2), the scale applied inside the GEMM (β = 0: the uninitialized output is not read).
at::Tensor scaled_mm(const at::Tensor& m1, const at::Tensor& m2, double s) {
  at::Tensor out = at::empty({m1.size(0), m2.size(1)}, m1.options());
  return at::addmm_out(out, out, m1, m2, 0, s);
}

// m1 m2 in `dtype` (an adapter's fp32 gradient from bf16/fp16 factors: cuBLAS writes its fp32
// sums unrounded, and autograd has no cast to add).
at::Tensor mm_to(const at::Tensor& m1, const at::Tensor& m2, at::ScalarType dtype) {
  if (dtype == m1.scalar_type() || !m1.is_cuda()) return at::mm(m1, m2);
  return at::mm(m1, m2, dtype);
}

// Whether Projections run LoRA's work on a side stream (ftscript_overlap_lora).
std::atomic<bool> overlap_lora{false};

// LoRA's work beside the frozen GEMMs: on its side stream of the GPU, its memory-bound kernels
// run in the SMs that the GEMMs' tails leave idle. `Side` opens with the side stream waiting for
// what the current stream has queued; tensors made on the side are handed over (the allocator
// keeps their memory until the current stream's uses are done); `join` makes the current stream
// wait for the side's work.
class Side {
 public:
  explicit Side(const at::Tensor& like)
      : main_(ftscript_cuda()->getStream(like.device())), side_(ftscript_side_stream(like.device(), SideUse::Lora)) {
    ftscript_after(main_, side_);
  }
  c10::Stream stream() const { return side_; }
  void hand_over(const at::Tensor& t) const {
    if (t.defined()) ftscript_cuda()->recordDataPtrOnStream(t.storage().data_ptr(), main_);
  }
  void join() const { ftscript_after(side_, main_); }

 private:
  c10::Stream main_, side_;
};

// The projections of one input x [N, in] by frozen weights W_i [out_i, in] (biases b_i), some with
// a LoRA adapter (A_j [r, in], B_j [out_i, r], fp32 or x's dtype, scale s_j, dropout p_j):
// `y_i = x W_iᵀ + b_i + s_j · (dropout_j(x) A_jᵀ) B_jᵀ`, as separate linear layers compute them
// (the same kernels, dropout masks drawn in projection order). Backward forms
// `∂x = Σ ∂y_i W_i + Σ mask_j ⊙ (s_j ∂y_i B_j) A_j / (1 − p_j)` by accumulating GEMMs into one
// buffer, where autograd would add up a separate tensor per projection and adapter.
struct Projections : public torch::autograd::Function<Projections> {
  static variable_list forward(AutogradContext* ctx, const at::Tensor& x, at::TensorList a, at::TensorList b,
                               std::vector<at::Tensor> weights, std::vector<at::Tensor> biases,
                               std::vector<int64_t> adapter_of, std::vector<double> scales,
                               std::vector<double> dropouts) {
    TORCH_CHECK(x.dim() == 2, "projections: x must be 2-D, got ", x.sizes());
    int64_t next_adapter = 0;
    for (int64_t j : adapter_of)
      TORCH_CHECK(j < 0 || j == next_adapter++, "projections: adapters must be numbered in projection order");
    // per adapter: dropout(x), mask (or undefined), s·xa, A, B in x's dtype; drawn in adapter
    // order, as separate layers draw their masks
    std::vector<at::Tensor> saved;
    std::optional<Side> side;
    if (overlap_lora && x.is_cuda() && !a.empty()) side.emplace(x);
    {
      std::optional<c10::StreamGuard> on_side;
      if (side) on_side.emplace(side->stream());
      for (size_t j = 0; j < a.size(); j++) {
        at::Tensor aj = a[j].to(x.scalar_type()), bj = b[j].to(x.scalar_type()), xd = x, mask;
        if (dropouts[j] > 0) std::tie(xd, mask) = at::native_dropout(x, dropouts[j], true);
        at::Tensor xa = scaled_mm(xd, aj.t(), scales[j]);
        for (const at::Tensor& t : {xd, mask, xa, aj, bj}) {
          saved.push_back(t);
          if (side) side->hand_over(t);
        }
      }
    }
    variable_list ys;
    for (size_t i = 0; i < weights.size(); i++)
      ys.push_back(biases[i].defined() ? at::addmm(biases[i], x, weights[i].t()) : at::mm(x, weights[i].t()));
    if (side) side->join();
    for (size_t i = 0; i < weights.size(); i++)
      if (adapter_of[i] >= 0) ys[i].addmm_(saved[5 * adapter_of[i] + 2], saved[5 * adapter_of[i] + 4].t());
    ctx->saved_data["weights"] = weights;
    ctx->saved_data["adapter_of"] = adapter_of;
    ctx->saved_data["scales"] = scales;
    ctx->saved_data["dropouts"] = dropouts;
    ctx->saved_data["saved"] = saved;
    ctx->saved_data["adapters"] = (int64_t)a.size();
    std::vector<int64_t> dtypes;  // the adapters' own, for their gradients
    for (const at::Tensor& t : a) dtypes.push_back((int64_t)t.scalar_type());
    ctx->saved_data["dtypes"] = dtypes;
    return ys;
  }
  static variable_list backward(AutogradContext* ctx, variable_list dys) {
    auto weights = ctx->saved_data["weights"].toTensorVector();
    auto adapter_of = ctx->saved_data["adapter_of"].toIntVector();
    auto scales = ctx->saved_data["scales"].toDoubleVector();
    auto dropouts = ctx->saved_data["dropouts"].toDoubleVector();
    auto saved = ctx->saved_data["saved"].toTensorVector();
    int64_t m = ctx->saved_data["adapters"].toInt();
    auto dtypes = ctx->saved_data["dtypes"].toIntVector();
    bool want_x = ctx->needs_input_grad(0);
    at::Tensor dx;
    auto accumulate = [&](const at::Tensor& d, const at::Tensor& w) {
      if (!dx.defined()) dx = at::mm(d, w);
      else dx.addmm_(d, w);
    };
    // the adapters' GEMMs on the side stream while the frozen weights' run on this one
    variable_list da(m), db(m), us(m);
    std::optional<Side> side;
    if (overlap_lora && m > 0 && saved[0].is_cuda()) side.emplace(saved[0]);
    {
      std::optional<c10::StreamGuard> on_side;
      if (side) on_side.emplace(side->stream());
      for (size_t i = 0; i < weights.size(); i++) {
        int64_t j = adapter_of[i];
        const at::Tensor& dy = dys[i];
        if (j < 0 || !dy.defined()) continue;
        // forward saved adapter j's five tensors j-th (adapters are numbered in projection order)
        const at::Tensor *xd = &saved[5 * j], *xa = xd + 2, *bj = xd + 4;
        us[j] = scaled_mm(dy, *bj, scales[j]);  // ∂L/∂(dropout(x) Aᵀ)
        db[j] = mm_to(dy.t(), *xa, (at::ScalarType)dtypes[j]);
        da[j] = mm_to(us[j].t(), *xd, (at::ScalarType)dtypes[j]);
        if (side)
          for (const at::Tensor& t : {us[j], da[j], db[j]}) side->hand_over(t);
      }
    }
    if (want_x)
      for (size_t i = 0; i < weights.size(); i++)
        if (dys[i].defined()) accumulate(dys[i], weights[i]);
    if (side) side->join();
    for (int64_t j = 0; j < m && want_x; j++) {
      if (!us[j].defined()) continue;
      const at::Tensor *xd = &saved[5 * j], *mask = xd + 1, *aj = xd + 3;
      if (mask->defined()) {
        if (!dx.defined()) dx = at::zeros_like(*xd);
        masked_accumulate(dx, *mask, us[j], *aj, 1.0 / (1.0 - dropouts[j]));
      } else {
        accumulate(us[j], *aj);
      }
    }
    variable_list grads = {dx};
    for (int64_t j = 0; j < m; j++) grads.push_back(da[j]);
    for (int64_t j = 0; j < m; j++) grads.push_back(db[j]);
    for (int k = 0; k < 5; k++) grads.push_back(at::Tensor());  // the non-tensor arguments
    return grads;
  }
};
// Gemma 2's soft-capped, masked softmax over raw attention scores x [B, heads, tq, tk] with
// `allowed` [B, 1, tq, tk] (bool): softmax(cap · tanh(x · scale / cap), masked) in fp32, stored in
// x's dtype. Saves x and the probabilities (the unfused ops keep about four fp32 score matrices).
struct SoftcapSoftmax : public torch::autograd::Function<SoftcapSoftmax> {
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& x, const at::Tensor& allowed, double scale,
                            double cap) {
    TORCH_CHECK(x.dim() == 4 && allowed.dim() == 4 && allowed.size(0) == x.size(0) && allowed.size(1) == 1 &&
                    allowed.size(2) == x.size(2) && allowed.size(3) == x.size(3) && allowed.scalar_type() == at::kBool,
                "softcap_softmax: scores ", x.sizes(), " and mask ", allowed.sizes(), " (", allowed.scalar_type(),
                ") do not fit");
    at::Tensor xc = x.contiguous(), a = allowed.contiguous(), p = at::empty_like(xc);
    int tk = (int)xc.size(3), tq = (int)xc.size(2), heads = (int)xc.size(1);
    float sc = (float)scale, cp = (float)cap;
    long long rows = xc.numel() / tk;
    void *px = xc.data_ptr(), *pa = a.data_ptr(), *pp = p.data_ptr();
    void* params[] = {&px, &pa, &pp, &tk, &tq, &heads, &sc, &cp};
    launch("softcap_softmax_fwd", xc, rows * 256, params, 256);  // kernels.cu's SOFTCAP_THREADS
    ctx->save_for_backward({xc, p});
    ctx->saved_data["scale"] = scale;
    ctx->saved_data["cap"] = cap;
    return p;
  }
  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    variable_list saved = ctx->get_saved_variables();
    at::Tensor x = saved[0], p = saved[1], dp = grads[0].contiguous(), dx = at::empty_like(x);
    int tk = (int)x.size(3);
    float sc = (float)ctx->saved_data["scale"].toDouble(), cp = (float)ctx->saved_data["cap"].toDouble();
    long long rows = x.numel() / tk;
    void *px = x.data_ptr(), *pp = p.data_ptr(), *pdp = dp.data_ptr(), *pdx = dx.data_ptr();
    void* params[] = {&px, &pp, &pdp, &pdx, &tk, &sc, &cp};
    launch("softcap_softmax_bwd", x, rows * 256, params, 256);
    return {dx, at::Tensor(), at::Tensor(), at::Tensor()};
  }
};
}  // namespace

extern "C" int ftscript_softcap_softmax(const char* src, const at::Tensor* x, const at::Tensor* allowed, double scale,
                                        double cap, at::Tensor** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    *out = new at::Tensor(SoftcapSoftmax::apply(*x, *allowed, scale, cap));
  });
}

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

// One decoding step's attention (kernels.cu's decode_attention; no autograd): q [B, heads, 1, d],
// k, v [B, kv_heads, cap, d] contiguous, valid [B, cap] bool, at [1] int64 (the step's slot);
// window ≤ 0 for none, softcap ≤ 0 for none. Out: [B, 1, heads·d].
extern "C" int ftscript_decode_attention(const char* src, const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                         const at::Tensor* valid, const at::Tensor* at, int64_t window, double scale,
                                         double softcap, at::Tensor** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    at::Tensor qc = q->contiguous();
    TORCH_CHECK(qc.dim() == 4 && qc.size(2) == 1 && k->dim() == 4 && k->sizes() == v->sizes() && k->is_contiguous() &&
                    v->is_contiguous() && k->scalar_type() == qc.scalar_type() && v->scalar_type() == qc.scalar_type() &&
                    k->size(0) == qc.size(0) && k->size(3) == qc.size(3) && qc.size(1) % k->size(1) == 0 &&
                    valid->scalar_type() == at::kBool && valid->is_contiguous() && valid->dim() == 2 &&
                    valid->size(0) == qc.size(0) && valid->size(1) == k->size(2) && at->scalar_type() == at::kLong &&
                    k->size(2) <= 4096 && qc.size(3) <= 256 && qc.size(3) % 8 == 0 && aligned16({&qc, k, v}),
                // kernels.cu's DECODE_MAX_CAP, DECODE_MAX_DIM, and rows read 8 elements at once
                "decode_attention: query ", qc.sizes(), ", keys ", k->sizes(), ", values ", v->sizes(), ", valid ",
                valid->sizes(), " do not fit");
    int b = (int)qc.size(0), heads = (int)qc.size(1), dim = (int)qc.size(3), kv_heads = (int)k->size(1),
        cap = (int)k->size(2), win = (int)window;
    float sc = (float)scale, cp = (float)softcap;
    at::Tensor o = at::empty({b, 1, heads * dim}, qc.options());
    void *pq = qc.data_ptr(), *pk = k->data_ptr(), *pv = v->data_ptr(), *pm = valid->data_ptr(), *pa = at->data_ptr(),
         *po = o.data_ptr();
    void* params[] = {&pq, &pk, &pv, &pm, &pa, &po, &heads, &kv_heads, &cap, &dim, &win, &sc, &cp};
    launch("decode_attention", qc, (long long)b * heads * 256, params, 256, true);  // kernels.cu's DECODE_THREADS
    *out = new at::Tensor(o);
  });
}

// A decoding step's heads from the joint projection (kernels.cu's decode_qkv; no autograd): qkv
// [B, 1, row] (or [B, row]) with `heads` query heads, then `kv_heads` key and value heads of `dim`
// each from its start; cos, sin [B, 1, dim]; qw, kw the q/k norms' weights (null for none);
// kc, vc [B, kv_heads, cap, dim], at [1] int64. Writes the keys and values into slot `at`; out: the
// rotated queries [B, heads, 1, dim].
extern "C" int ftscript_decode_qkv(const char* src, const at::Tensor* qkv, const at::Tensor* cos,
                                   const at::Tensor* sin, const at::Tensor* qw, const at::Tensor* kw, double eps,
                                   const at::Tensor* kc, const at::Tensor* vc, const at::Tensor* at, int64_t heads,
                                   at::Tensor** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    const long long b = kc->size(0), kv_heads = kc->size(1), cap = kc->size(2), dim = kc->size(3);
    long long row = qkv->size(-1);
    auto fits = [&](const at::Tensor* t) { return !t || (t->is_contiguous() && t->numel() == dim && t->scalar_type() == qkv->scalar_type()); };
    TORCH_CHECK(qkv->is_contiguous() && qkv->numel() == b * row && row >= (heads + 2 * kv_heads) * dim && row % 8 == 0 &&
                    cos->is_contiguous() && sin->is_contiguous() && cos->numel() == b * dim && sin->numel() == b * dim &&
                    kc->is_contiguous() && vc->is_contiguous() && kc->sizes() == vc->sizes() && dim % 16 == 0 &&
                    dim <= 256 && fits(qw) && fits(kw) && at->scalar_type() == at::kLong &&
                    cos->scalar_type() == qkv->scalar_type() && sin->scalar_type() == qkv->scalar_type() &&
                    kc->scalar_type() == qkv->scalar_type() && vc->scalar_type() == qkv->scalar_type() &&
                    aligned16({qkv, cos, sin, kc, vc}) && (!qw || aligned16({qw})) && (!kw || aligned16({kw})),
                "decode_qkv: projections ", qkv->sizes(), ", cos/sin ", cos->sizes(), ", caches ", kc->sizes(),
                " do not fit");
    at::Tensor q = at::empty({b, heads, 1, dim}, qkv->options());
    const void *pqkv = qkv->data_ptr(), *pc = cos->data_ptr(), *ps = sin->data_ptr(),
               *pqw = qw ? qw->data_ptr() : nullptr, *pkw = kw ? kw->data_ptr() : nullptr, *pat = at->data_ptr();
    void *pq = q.data_ptr(), *pk = kc->data_ptr(), *pv = vc->data_ptr();
    float e = (float)eps;
    int ib = (int)b, ih = (int)heads, ikv = (int)kv_heads, id = (int)dim, icap = (int)cap;
    void* params[] = {&pqkv, &row, &pc, &ps, &pqw, &pkw, &e, &pq, &pk, &pv, &pat, &ib, &ih, &ikv, &id, &icap};
    launch("decode_qkv", q, b * (heads + 2 * kv_heads) * 32, params, 256, true);  // a warp per head
    *out = new at::Tensor(q);
  });
}

// y = x Wᵀ (+ bias) (+ xa Bᵀ) for at most 8 rows (kernels.cu's decode_linear; no autograd): x [.., in]
// contiguous, w [out, in] contiguous, bias [out] or null, xa [rows, rank] and lb [out, rank] or null.
extern "C" int ftscript_decode_linear(const char* src, const at::Tensor* x, const at::Tensor* w, const at::Tensor* bias,
                                      const at::Tensor* xa, const at::Tensor* lb, at::Tensor** out, char* err,
                                      size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    const long long in = w->size(1), o = w->size(0), rows = x->numel() / in, rank = xa ? xa->size(-1) : 0;
    auto same = [&](const at::Tensor* t) { return !t || (t->is_contiguous() && t->scalar_type() == x->scalar_type()); };
    TORCH_CHECK(x->is_contiguous() && w->is_contiguous() && x->size(-1) == in && rows >= 1 && rows <= 8 && in % 8 == 0 &&
                    w->scalar_type() == x->scalar_type() && same(bias) && same(xa) && same(lb) &&
                    (!bias || bias->numel() == o) && (!xa == !lb) &&
                    (!xa || (xa->numel() == rows * rank && lb->size(0) == o && lb->size(1) == rank)) && aligned16({x, w}),
                "decode_linear: input ", x->sizes(), ", weight ", w->sizes(), " do not fit");
    std::vector<int64_t> shape = x->sizes().vec();
    shape.back() = o;
    at::Tensor y = at::empty(shape, x->options());
    const void *px = x->data_ptr(), *pw = w->data_ptr(), *pb = bias ? bias->data_ptr() : nullptr,
               *pxa = xa ? xa->data_ptr() : nullptr, *plb = lb ? lb->data_ptr() : nullptr;
    void* py = y.data_ptr();
    int r = (int)rows, i = (int)in, oo = (int)o, k = (int)rank;
    void* params[] = {&px, &pw, &pb, &pxa, &plb, &py, &r, &i, &oo, &k};
    launch("decode_linear", y, o * 32, params, 256, true);  // a warp per output
    *out = new at::Tensor(y);
  });
}

// silu(gate) · up for gu [N, 2·width] holding each row's gate and up side by side (no autograd).
extern "C" int ftscript_swiglu_halves(const char* src, const at::Tensor* gu, at::Tensor** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    const long long width = gu->size(-1) / 2;
    TORCH_CHECK(gu->is_contiguous() && gu->size(-1) % 16 == 0, "swiglu_halves: ", gu->sizes(), " does not fit");
    std::vector<int64_t> shape = gu->sizes().vec();
    shape.back() = width;
    at::Tensor o = at::empty(shape, gu->options());
    long long n = o.numel();
    int w = (int)width, vec = aligned16({gu, &o});
    const void* pg = gu->data_ptr();
    void* po = o.data_ptr();
    void* params[] = {&pg, &po, &n, &w, &vec};
    launch("swiglu_halves", o, (n + 7) / 8, params, 256, true);
    *out = new at::Tensor(o);
  });
}

// Turns the side stream of Projections on or off (off at start).
extern "C" void ftscript_overlap_lora(int on) { overlap_lora = on != 0; }

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

// [`Projections`] of `x` by `n` frozen weights (`biases[i]` may be null); projection i has the
// adapter `adapter_of[i]` (−1: none) of the `m` given by `a`, `b`, `scales`, `dropouts`.
extern "C" int ftscript_projections(const char* src, const at::Tensor* x, const at::Tensor* const* weights,
                                    const at::Tensor* const* biases, const int64_t* adapter_of, int n,
                                    const at::Tensor* const* a, const at::Tensor* const* b, const double* scales,
                                    const double* dropouts, int m, at::Tensor** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    std::vector<at::Tensor> w, bias, av, bv;
    for (int i = 0; i < n; i++) {
      w.push_back(*weights[i]);
      bias.push_back(biases[i] ? *biases[i] : at::Tensor());
    }
    for (int j = 0; j < m; j++) {
      av.push_back(*a[j]);
      bv.push_back(*b[j]);
    }
    variable_list ys = Projections::apply(*x, at::TensorList(av), at::TensorList(bv), w, bias, std::vector<int64_t>(adapter_of, adapter_of + n),
                                          std::vector<double>(scales, scales + m),
                                          std::vector<double>(dropouts, dropouts + m));
    for (int i = 0; i < n; i++) out[i] = new at::Tensor(ys[i]);
  });
}

// [`AddRmsNorm`] of `h` and `delta` (null: none) by `w`: `*sum` (null without delta) and `*out`.
extern "C" int ftscript_add_rms_norm(const char* src, const at::Tensor* h, const at::Tensor* delta, const at::Tensor* w,
                                     double eps, at::Tensor** sum, at::Tensor** out, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    kernel_source = src;
    variable_list r = AddRmsNorm::apply(*h, delta ? *delta : *h, *w, eps, delta != nullptr);
    *sum = delta ? new at::Tensor(r[0]) : nullptr;
    *out = new at::Tensor(r.back());
  });
}

// Attention of a forward without autograd, q [B, H, T, d] over k, v [B, H, S, d], causal or by
// the bool `mask` (null: none; true where a key is seen), by libtorch's SDPA with cuDNN's kernel
// left out: FlashAttention-2 where no mask is given, else the memory-efficient kernel. cuDNN
// builds an execution plan for each new shape (1.1 s for a 256-row prefill on an H100), and a
// generation's prompts change shape with every batch. `*out` [B, H, T, d].
extern "C" int ftscript_attention_without_cudnn(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v,
                                                const at::Tensor* mask, int causal, double scale, at::Tensor** out,
                                                char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    auto& ctx = at::globalContext();
    struct Restore {
      bool was;
      ~Restore() { at::globalContext().setSDPUseCuDNN(was); }
    } restore{ctx.userEnabledCuDNNSDP()};
    ctx.setSDPUseCuDNN(false);
    auto m = mask ? std::optional<at::Tensor>(*mask) : std::nullopt;
    *out = new at::Tensor(at::scaled_dot_product_attention(*q, *k, *v, m, 0.0, causal != 0, scale, false));
  });
}

// Causal attention (no dropout) of q [B, H, T, d] over k, v [B, H_kv, T, d] (bf16 or fp16; H a
// multiple of H_kv, each key/value head read by H / H_kv query heads, which both kernels do
// without copies) by the kernel libtorch's SDPA picks for them, cuDNN's (`*cudnn` = 1) or FlashAttention-2's, keeping
// what its backward reads besides q, k and v: `*out` [B, H, T, d], the rows' log-sum-exp `*lse`
// (fp32) and the kernel's RNG state `*seed`, `*offset` (unused without dropout, handed back as
// given). No graph is recorded.
extern "C" int ftscript_flash_attention(const at::Tensor* q, const at::Tensor* k, const at::Tensor* v, double scale,
                                        at::Tensor** out, at::Tensor** lse, at::Tensor** seed, at::Tensor** offset,
                                        int* cudnn, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    bool grouped = k->size(1) != q->size(1);
    *cudnn = at::_fused_sdp_choice(*q, *k, *v, {}, 0.0, true, scale, grouped) == (int64_t)at::SDPBackend::cudnn_attention;
    if (*cudnn) {
      auto r = at::_scaled_dot_product_cudnn_attention(*q, *k, *v, std::nullopt, true, 0.0, true, false, scale);
      *out = new at::Tensor(std::get<0>(r));
      *lse = new at::Tensor(std::get<1>(r));
      *seed = new at::Tensor(std::get<6>(r));
      *offset = new at::Tensor(std::get<7>(r));
    } else {
      auto r = at::_scaled_dot_product_flash_attention(*q, *k, *v, 0.0, true, false, scale);
      *out = new at::Tensor(std::get<0>(r));
      *lse = new at::Tensor(std::get<1>(r));
      *seed = new at::Tensor(std::get<6>(r));
      *offset = new at::Tensor(std::get<7>(r));
    }
  });
}

// The gradients `*dq`, `*dk`, `*dv` of ftscript_flash_attention's output from `dout` (its shape
// and layout), from the forward's inputs, `out`, `lse`, RNG state and kernel; no graph is recorded.
// `*dk`, `*dv` have k's and v's heads (a shared head's gradient sums its query heads').
extern "C" int ftscript_flash_attention_backward(const at::Tensor* dout, const at::Tensor* q, const at::Tensor* k,
                                                 const at::Tensor* v, const at::Tensor* out, const at::Tensor* lse,
                                                 const at::Tensor* seed, const at::Tensor* offset, int cudnn,
                                                 double scale, at::Tensor** dq, at::Tensor** dk, at::Tensor** dv,
                                                 char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    at::NoGradGuard no_grad;
    auto r = cudnn ? at::_scaled_dot_product_cudnn_attention_backward(*dout, *q, *k, *v, *out, *lse, *seed, *offset,
                                                                      at::Tensor(), at::Tensor(), at::Tensor(),
                                                                      q->size(2), k->size(2), 0.0, true, scale)
                   : at::_scaled_dot_product_flash_attention_backward(*dout, *q, *k, *v, *out, *lse, at::Tensor(),
                                                                      at::Tensor(), q->size(2), k->size(2), 0.0, true,
                                                                      *seed, *offset, scale);
    *dq = new at::Tensor(std::get<0>(r));
    *dk = new at::Tensor(std::get<1>(r));
    *dv = new at::Tensor(std::get<2>(r));
  });
}
