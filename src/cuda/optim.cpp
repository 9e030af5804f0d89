// The optimizer step over lists of tensors in few kernels: AdamW through torch's multi-tensor
// `_fused_adamw_` (what `torch.optim.AdamW(fused=True)` runs), and the global gradient norm with
// clipping through `_foreach_norm` / `_foreach_mul_` (what `clip_grad_norm_(foreach=True)`
// runs). Tensors are grouped by device and dtype, as torch.optim groups them. A C boundary for
// Rust: tensors travel as `at::Tensor*`; errors come back as text.
#include <ATen/ATen.h>
#include "guarded.h"
#include <c10/core/GradMode.h>

#include <cstdio>
#include <map>
#include <vector>

namespace {
// Indices of the parameters with a gradient, grouped by (device, dtype).
std::map<std::pair<std::string, at::ScalarType>, std::vector<int>> groups(const at::Tensor* const* params, int n) {
  std::map<std::pair<std::string, at::ScalarType>, std::vector<int>> g;
  for (int i = 0; i < n; i++)
    if (params[i]->grad().defined()) g[{params[i]->device().str(), params[i]->scalar_type()}].push_back(i);
  return g;
}
}  // namespace

// One AdamW step (decoupled weight decay) at step number `step` (1-based) of every parameter
// with a gradient; `exp_avg` / `exp_avg_sq` are the moments, updated in place.
extern "C" int ftscript_adamw_fused(const at::Tensor* const* params, const at::Tensor* const* exp_avg,
                                    const at::Tensor* const* exp_avg_sq, int n, long long step, double lr, double beta1,
                                    double beta2, double weight_decay, double eps, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    c10::NoGradGuard no_grad;
    for (const auto& [key, idx] : groups(params, n)) {
      std::vector<at::Tensor> p, g, m, v;
      for (int i : idx) {
        p.push_back(*params[i]);
        g.push_back(params[i]->grad());
        m.push_back(*exp_avg[i]);
        v.push_back(*exp_avg_sq[i]);
      }
      at::Tensor t = at::full({}, (double)step, p[0].options().dtype(at::kFloat));
      std::vector<at::Tensor> steps(p.size(), t);
      at::_fused_adamw_(p, g, m, v, {}, steps, lr, beta1, beta2, weight_decay, eps, false, false);
    }
  });
}

// The L2 norm of all gradients together (a 0-dim fp32 tensor on the first gradient's device);
// when `max_norm` > 0, gradients are scaled by min(1, max_norm / (norm + 1e-6)).
extern "C" int ftscript_clip_grad_norm(const at::Tensor* const* params, int n, double max_norm, at::Tensor** total,
                                       char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    c10::NoGradGuard no_grad;
    auto gs = groups(params, n);
    std::vector<std::vector<at::Tensor>> grads;
    std::vector<at::Tensor> norms;
    c10::optional<at::Device> first;
    for (const auto& [key, idx] : gs) {
      std::vector<at::Tensor> g;
      for (int i : idx) g.push_back(params[i]->grad());
      if (!first) first = g[0].device();
      for (const at::Tensor& norm : at::_foreach_norm(g, 2)) norms.push_back(norm.to(*first, at::kFloat));
      grads.push_back(std::move(g));
    }
    if (norms.empty()) {
      *total = new at::Tensor(at::zeros({}, at::kFloat));
      return;
    }
    at::Tensor norm = at::stack(norms).norm();
    if (max_norm > 0) {
      at::Tensor coef = (max_norm / (norm + 1e-6)).clamp_max(1.0);
      for (auto& g : grads) at::_foreach_mul_(g, coef.to(g[0].device(), g[0].scalar_type()));
    }
    *total = new at::Tensor(norm);
  });
}

// Sets every defined gradient to zero, one multi-tensor kernel per device and dtype.
extern "C" int ftscript_zero_grads(const at::Tensor* const* params, int n, char* err, size_t err_len) {
  return ftscript_guarded(err, err_len, [&] {
    c10::NoGradGuard no_grad;
    for (const auto& [key, idx] : groups(params, n)) {
      std::vector<at::Tensor> g;
      for (int i : idx) g.push_back(params[i]->grad());
      at::_foreach_zero_(g);
    }
  });
}
