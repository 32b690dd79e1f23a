// panther::sketched_linear — the SKLinear layer's op.
//
//   y = 1/(2L) Σ_i [(x S1_i) U1_i + (x U2_i) S2_i] + b
//
// collapses exactly into two GEMMs over concatenated factors (term-major):
//   A  = [S1_1 .. S1_L | U2_1 .. U2_L]            (d_in, 2Lk)
//   Bm = [U1_1; ..; U1_L; S2_1; ..; S2_L]          (2Lk, d_out)
//   xA = x A,  y = xA Bm / (2L) + b   (scale and bias in the second GEMM via addmm)
// so there is no per-term loop and no (L, N, d_out) temporary. `sketched_linear_fwd` also
// returns xA so that the backward can reuse it (optimal 6·N·L·k·(d_in+d_out) FLOPs);
// `sketched_linear` is the user-facing single-output op, a composite over it.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

namespace panther {
namespace {

using at::Tensor;

void check_factors(const Tensor& x, const Tensor& S1s, const Tensor& S2s, const Tensor& U1s,
                   const Tensor& U2s, const c10::optional<Tensor>& bias) {
  TORCH_CHECK_VALUE(S1s.dim() == 3 && S2s.dim() == 3 && U1s.dim() == 3 && U2s.dim() == 3,
                    "sketched_linear: S1s, S2s, U1s, U2s must be 3-D (L, ., .)");
  const auto L = S1s.size(0), d_in = S1s.size(1), k = S1s.size(2), d_out = S2s.size(2);
  TORCH_CHECK_VALUE(S2s.sizes() == at::IntArrayRef({L, k, d_out}), "sketched_linear: S2s must be (L, k, d_out) = (",
                    L, ", ", k, ", ", d_out, "), got ", S2s.sizes());
  TORCH_CHECK_VALUE(U1s.sizes() == at::IntArrayRef({L, k, d_out}), "sketched_linear: U1s must be (L, k, d_out) = (",
                    L, ", ", k, ", ", d_out, "), got ", U1s.sizes());
  TORCH_CHECK_VALUE(U2s.sizes() == at::IntArrayRef({L, d_in, k}), "sketched_linear: U2s must be (L, d_in, k) = (",
                    L, ", ", d_in, ", ", k, "), got ", U2s.sizes());
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) == d_in, "sketched_linear: x must have last dimension in_features=",
                    d_in, ", got shape ", x.sizes());
  for (const Tensor* t : {&S1s, &S2s, &U1s, &U2s}) {
    TORCH_CHECK_VALUE(t->device() == x.device(), "sketched_linear: all factors must be on x's device ", x.device(),
                      ", got ", t->device());
    TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type(), "sketched_linear: all factors must have x's dtype ",
                     x.scalar_type(), ", got ", t->scalar_type());
  }
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == d_out, "sketched_linear: bias must be (out_features,) = (",
                      d_out, ",), got ", bias->sizes());
    TORCH_CHECK_VALUE(bias->device() == x.device(), "sketched_linear: bias must be on x's device");
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "sketched_linear: bias must have x's dtype ",
                     x.scalar_type(), ", got ", bias->scalar_type());
  }
}

std::vector<int64_t> with_last(at::IntArrayRef sizes, int64_t last) {
  std::vector<int64_t> out(sizes.begin(), sizes.end());
  out.back() = last;
  return out;
}

std::tuple<Tensor, Tensor> sketched_linear_fwd(const Tensor& x, const Tensor& S1s, const Tensor& S2s,
                                               const Tensor& U1s, const Tensor& U2s,
                                               const c10::optional<Tensor>& bias) {
  check_factors(x, S1s, S2s, U1s, U2s, bias);
  const auto L = S1s.size(0), d_in = S1s.size(1), k = S1s.size(2), d_out = S2s.size(2);
  const Tensor x2 = x.reshape({-1, d_in});
  // (L, d_in, k) -> (d_in, L*k): term-major columns. A view when L == 1, a small copy otherwise.
  const Tensor A = at::cat({S1s.permute({1, 0, 2}).reshape({d_in, L * k}),
                            U2s.permute({1, 0, 2}).reshape({d_in, L * k})}, 1);
  const Tensor Bm = at::cat({U1s.reshape({L * k, d_out}), S2s.reshape({L * k, d_out})}, 0);
  const Tensor xA = at::mm(x2, A);
  // The 1/(2L) rides in the GEMM's alpha: no extra pass over y or over the factors.
  const double alpha = 1.0 / (2.0 * L);
  Tensor y;
  if (bias.has_value()) {
    y = at::addmm(*bias, xA, Bm, /*beta=*/1, alpha);
  } else {
    y = at::empty({xA.size(0), d_out}, xA.options());
    at::addmm_out(y, y, xA, Bm, /*beta=*/0, alpha);  // beta = 0: y's uninitialised values are never read
  }
  return {y.view(with_last(x.sizes(), d_out)), xA.view(with_last(x.sizes(), 2 * L * k))};
}

Tensor sketched_linear(const Tensor& x, const Tensor& S1s, const Tensor& S2s, const Tensor& U1s,
                       const Tensor& U2s, const c10::optional<Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::sketched_linear_fwd", "")
                       .typed<decltype(sketched_linear_fwd)>();
  return std::get<0>(op.call(x, S1s, S2s, U1s, U2s, bias));
}

// Autocast: run in the autocast dtype (bf16/fp16); GEMMs accumulate in fp32 internally.
template <c10::DeviceType device_type>
std::tuple<Tensor, Tensor> sketched_linear_fwd_autocast(const Tensor& x, const Tensor& S1s, const Tensor& S2s,
                                                        const Tensor& U1s, const Tensor& U2s,
                                                        const c10::optional<Tensor>& bias) {
  c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::sketched_linear_fwd", "")
                       .typed<decltype(sketched_linear_fwd)>();
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  auto cast = [&](const Tensor& t) { return at::autocast::cached_cast(dtype, t, device_type); };
  c10::optional<Tensor> b;
  if (bias.has_value()) b = cast(*bias);
  return op.call(cast(x), cast(S1s), cast(S2s), cast(U1s), cast(U2s), b);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(panther, m) {
  m.def("sketched_linear_fwd(Tensor x, Tensor S1s, Tensor S2s, Tensor U1s, Tensor U2s, Tensor? bias)"
        " -> (Tensor, Tensor)");
  m.def("sketched_linear(Tensor x, Tensor S1s, Tensor S2s, Tensor U1s, Tensor U2s, Tensor? bias) -> Tensor",
        torch::dispatch(c10::DispatchKey::CompositeImplicitAutograd, TORCH_FN(sketched_linear)));
}

TORCH_LIBRARY_IMPL(panther, CPU, m) { m.impl("sketched_linear_fwd", TORCH_FN(sketched_linear_fwd)); }
// ATen dispatches the two GEMMs to cuBLAS on CUDA tensors.
TORCH_LIBRARY_IMPL(panther, CUDA, m) { m.impl("sketched_linear_fwd", TORCH_FN(sketched_linear_fwd)); }
TORCH_LIBRARY_IMPL(panther, AutocastCPU, m) {
  m.impl("sketched_linear_fwd", TORCH_FN(sketched_linear_fwd_autocast<c10::DeviceType::CPU>));
}
TORCH_LIBRARY_IMPL(panther, AutocastCUDA, m) {
  m.impl("sketched_linear_fwd", TORCH_FN(sketched_linear_fwd_autocast<c10::DeviceType::CUDA>));
}

}  // namespace panther
