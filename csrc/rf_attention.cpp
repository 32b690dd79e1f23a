// Random-feature attention (FAVOR+ positive softmax features, ReLU features) and the
// sine-SRPE positional filter. Schemas, ATen kernels (CPU and CUDA share them) and autocast
// wrappers live here; fake kernels, autograd and the plain-torch references are in
// panther/ops/attention.py.
//
// Layout: q (B, H, Lq, d), k (B, H, S, d), v (B, H, S, dv), projection (m, d).
// Everything is computed in fp32 (fp64 for fp64 inputs) and cast back to q's dtype.
//
// Stabilisers (all of them cancel exactly between numerator and denominator, so the math is
// shift-free and gradients treat the shifts as constants):
//  * query t: features exp(u_t - max_j u_tj), so the largest query feature is 1;
//  * keys, non-causal: one shift per (b, h) = max over the visible keys and features;
//  * keys, causal: key s uses the running max M_s of its prefix (never a future key), and
//    every cross-position weight carries exp(M_s - M_t) <= 1 (s <= t); chunk states are kept
//    at the reference of their chunk end and rescaled when the running max grows.
// The ones-column trick ([V | 1]) produces numerator and denominator from one product.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <array>
#include <cmath>
#include <limits>
#include <optional>
#include <string>
#include <tuple>

namespace {

using at::Tensor;

constexpr int64_t kChunk = 64;                 // causal chunk length
// Elements of one SRPE block's largest intermediate. A GPU takes a larger block: each block costs
// a few launches, and at 65,536 positions 2^20 elements meant about a thousand of them.
constexpr int64_t kSrpeBudget = int64_t{1} << 20;
constexpr int64_t kSrpeBudgetCuda = int64_t{1} << 24;
// "Minus infinity" that stays finite, so that differences of shifts never produce inf - inf.
constexpr double kLowest = -3.0e38;

enum class Kernel { Softmax, Relu };

Kernel parse_kernel(c10::string_view name) {
  if (name == "softmax") return Kernel::Softmax;
  if (name == "relu") return Kernel::Relu;
  TORCH_CHECK_VALUE(false, "rf_attention: kernel_fn must be 'softmax' or 'relu', got '",
                    std::string(name), "'");
}

at::ScalarType compute_type(const Tensor& t) {
  return t.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

void check_inputs(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& proj,
                  bool causal, std::optional<double> scale, const std::optional<Tensor>& mask) {
  TORCH_CHECK_VALUE(q.dim() == 4 && k.dim() == 4 && v.dim() == 4,
                    "rf_attention: q, k, v must be 4-D (B, H, L, d); got q ", q.sizes(), ", k ",
                    k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(q.size(0) == k.size(0) && q.size(0) == v.size(0) && q.size(1) == k.size(1) &&
                        q.size(1) == v.size(1),
                    "rf_attention: q, k, v must share batch and head sizes; got q ", q.sizes(),
                    ", k ", k.sizes(), ", v ", v.sizes());
  TORCH_CHECK_VALUE(k.size(3) == q.size(3), "rf_attention: k's last dim (", k.size(3),
                    ") must equal q's (", q.size(3), ")");
  TORCH_CHECK_VALUE(v.size(2) == k.size(2), "rf_attention: v's length (", v.size(2),
                    ") must equal k's (", k.size(2), ")");
  TORCH_CHECK_VALUE(q.size(3) >= 1, "rf_attention: head dim must be >= 1");
  TORCH_CHECK_VALUE(proj.dim() == 2 && proj.size(1) == q.size(3) && proj.size(0) >= 1,
                    "rf_attention: projection must be (m, d) with m >= 1 and d = ", q.size(3),
                    "; got ", proj.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(q.scalar_type()) && q.scalar_type() == k.scalar_type() &&
                       q.scalar_type() == v.scalar_type(),
                   "rf_attention: q, k, v must share one floating dtype; got ", q.scalar_type(),
                   ", ", k.scalar_type(), ", ", v.scalar_type());
  TORCH_CHECK_TYPE(at::isFloatingType(proj.scalar_type()),
                   "rf_attention: projection must be floating point, got ", proj.scalar_type());
  TORCH_CHECK_VALUE(q.device() == k.device() && q.device() == v.device() &&
                        q.device() == proj.device(),
                    "rf_attention: q, k, v, projection must be on one device");
  TORCH_CHECK_VALUE(!causal || q.size(2) == k.size(2),
                    "rf_attention: causal=True requires equal query and key lengths; got Lq=",
                    q.size(2), ", S=", k.size(2));
  if (scale.has_value()) {
    TORCH_CHECK_VALUE(std::isfinite(*scale) && *scale > 0,
                      "rf_attention: scale must be a positive finite float or None, got ", *scale);
  }
  if (mask.has_value() && mask->defined()) {
    const Tensor& mk = *mask;
    TORCH_CHECK_VALUE(mk.scalar_type() == at::kBool && mk.dim() == 2 && mk.size(0) == q.size(0) &&
                          mk.size(1) == k.size(2),
                      "rf_attention: key_padding_mask must be a bool tensor of shape (B, S) = (",
                      q.size(0), ", ", k.size(2), "); got ", mk.scalar_type(), " ", mk.sizes());
    TORCH_CHECK_VALUE(mk.device() == q.device(),
                      "rf_attention: key_padding_mask must be on q's device");
  }
}

const Tensor* get_mask(const std::optional<Tensor>& mask) {
  return (mask.has_value() && mask->defined()) ? &*mask : nullptr;
}

double feature_alpha(std::optional<double> scale, int64_t d) {
  // softmax features use x * scale^{1/2} so that E[phi(q).phi(k)] = exp(scale * q.k)
  double s = scale.has_value() ? *scale : 1.0 / std::sqrt(static_cast<double>(d));
  return std::sqrt(s);
}

// ---------------------------------------------------------------------------------------------
// Feature maps. `xs` is the (scaled) input the map saw, needed by the backward.

struct Features {
  Tensor phi;  // (B, H, L, m)
  Tensor xs;   // (B, H, L, d)
  Tensor M;    // keys, softmax only: per-position shift (B, H, L) causal / (B, H, 1) not
};

Features query_features(const Tensor& x, const Tensor& W, Kernel kern, double alpha) {
  const double rm = 1.0 / std::sqrt(static_cast<double>(W.size(0)));
  Features f;
  if (kern == Kernel::Relu) {
    f.xs = x;
    f.phi = at::relu(at::matmul(x, W.t())).mul_(rm);
    return f;
  }
  f.xs = x * alpha;
  // exp(u_j - |xs|^2/2 - max_j(u_j - |xs|^2/2)) = exp(u_j - max_j u_j): the norm term cancels
  // against the per-query shift, and 1/sqrt(m) is folded into the same subtraction.
  Tensor u = at::matmul(f.xs, W.t());
  Tensor c = at::amax(u, {-1}, /*keepdim=*/true).clamp_min_(kLowest).sub_(std::log(rm));
  f.phi = u.sub_(c).exp_();
  return f;
}

Features key_features(const Tensor& x, const Tensor& W, Kernel kern, double alpha, bool causal,
                      const Tensor* mask) {
  const double rm = 1.0 / std::sqrt(static_cast<double>(W.size(0)));
  const int64_t B = x.size(0), S = x.size(2);
  Features f;
  if (kern == Kernel::Relu) {
    f.xs = x;
    f.phi = at::relu(at::matmul(x, W.t())).mul_(rm);
  } else {
    f.xs = x * alpha;
    Tensor u = at::matmul(f.xs, W.t());
    Tensor h = f.xs.square().sum(-1).mul_(0.5);           // (B, H, S)
    Tensor kappa = at::amax(u, {-1}).sub_(h);              // largest exponent of each key
    if (mask) kappa.masked_fill_(mask->view({B, 1, S}), kLowest);  // masked keys set no shift
    kappa.clamp_min_(kLowest);
    f.M = causal ? std::get<0>(at::cummax(kappa, -1)) : at::amax(kappa, {-1}, true);
    // phi = exp(u - h - M) / sqrt(m) with one subtraction over the (S, m) block
    Tensor shift = (h + f.M).sub_(std::log(rm)).unsqueeze(-1);
    f.phi = u.sub_(shift).exp_();
  }
  // masked keys contribute nothing (masked_fill, so inf/NaN in a masked key cannot leak)
  if (mask) f.phi.masked_fill_(mask->view({B, 1, S, 1}), 0);
  return f;
}

// Gradient of the feature map: returns dx and accumulates into dW (if defined).
Tensor feature_backward(const Tensor& dphi, const Features& f, const Tensor& W, Kernel kern,
                        double alpha, Tensor* dW) {
  const int64_t m = W.size(0), d = W.size(1);
  if (kern == Kernel::Relu) {
    const double rm = 1.0 / std::sqrt(static_cast<double>(m));
    // phi > 0 exactly where the pre-activation is positive (and the key is not masked)
    Tensor du = dphi * (f.phi > 0).to(dphi.scalar_type()) * rm;
    if (dW) dW->add_(at::matmul(du.reshape({-1, m}).t(), f.xs.reshape({-1, d})));
    return at::matmul(du, W);
  }
  // phi = exp(u - shift)/sqrt(m): d phi / d u = phi; the shifts cancel in the attention output
  Tensor du = dphi * f.phi;
  if (dW) dW->add_(at::matmul(du.reshape({-1, m}).t(), f.xs.reshape({-1, d})));
  Tensor dxs = at::matmul(du, W);
  dxs.sub_(du.sum(-1, true) * f.xs);  // d/dxs of -||xs||^2/2
  return dxs.mul_(alpha);
}

Tensor append_ones(const Tensor& v) {
  auto sz = v.sizes().vec();
  sz.back() = 1;
  return at::cat({v, at::ones(sz, v.options())}, -1);
}

// num / den with den == 0 (no visible key, or no overlapping relu support) giving 0. NaN
// propagates because NaN == 0 is false.
Tensor safe_inverse(const Tensor& den) {
  return at::where(den == 0, at::zeros({}, den.options()), den.reciprocal());
}

// ---------------------------------------------------------------------------------------------
// Causal chunked linear attention over features. All quantities (B, H, NC, C, .).

struct Causal {
  int64_t L = 0, C = 0, NC = 0;
  bool decay = false;  // softmax: per-position shifts M (else plain tril)
  Tensor qc, kc, vc;   // chunked phi_q, phi_k, [v|1]
  Tensor D;            // decay * tril (B,H,NC,C,C) or bool strict-upper mask (C,C)
  Tensor Rc, Rprev;    // chunk-end reference, previous chunk's reference (B,H,NC)
  Tensor facq;         // exp(Rprev - M_t) (B,H,NC,C,1)
  Tensor ek;           // exp(M_s - R_c)   (B,H,NC,C,1)
  Tensor kd;           // kc * ek
  Tensor A;            // intra-chunk weights (B,H,NC,C,C)
  Tensor states;       // S_{c-1} at reference Rprev_c (B,H,NC,m,dv+1)
};

Tensor pad_chunks(const Tensor& t, int64_t NC, int64_t C) {
  // (B,H,L,X) -> (B,H,NC,C,X), zero-padded at the end
  const int64_t L = t.size(2), Lp = NC * C;
  Tensor p = Lp == L ? t : at::constant_pad_nd(t, {0, 0, 0, Lp - L}, 0);
  return p.reshape({t.size(0), t.size(1), NC, C, t.size(3)});
}

Tensor apply_intra_mask(Tensor a, const Causal& cz) {
  return cz.decay ? a.mul_(cz.D) : a.masked_fill_(cz.D, 0);
}

// Exclusive scan of per-chunk increments with reference rescaling; every step only rescales
// and adds, so nothing is ever recovered by subtraction from a total.
// forward=true : out[c] = sum_{c'<c} inc[c'] * exp(R_{c'} - Rprev_c)     (S_{c-1})
// forward=false: out[c] = sum_{c'>c} inc[c'] * exp(Rprev_{c'} - R_c)     (P_c)
Tensor chunk_scan(const Tensor& inc, const Causal& cz, bool forward) {
  const int64_t NC = cz.NC;
  if (!cz.decay) {
    Tensor z = at::zeros_like(inc.narrow(2, 0, 1));
    if (forward) return at::cat({z, at::cumsum(inc.narrow(2, 0, NC - 1), 2)}, 2);
    Tensor rev = at::cumsum(inc.narrow(2, 1, NC - 1).flip({2}), 2).flip({2});
    return at::cat({rev, z}, 2);
  }
  Tensor out = at::empty_like(inc);
  Tensor S = at::zeros_like(inc.select(2, 0));
  // chunk c moves the reference from Rprev_c to R_c (ratio exp(Rprev_c - R_c) <= 1)
  Tensor ratio = (cz.Rprev - cz.Rc).exp_().unsqueeze(-1).unsqueeze(-1);  // (B,H,NC,1,1)
  for (int64_t i = 0; i < NC; ++i) {
    const int64_t c = forward ? i : NC - 1 - i;
    out.select(2, c).copy_(S);
    S.mul_(ratio.select(2, c)).add_(inc.select(2, c));  // S_c = S_{c-1} r_c + dS_c (or reversed)
  }
  return out;
}

Causal causal_prepare(const Tensor& phiq, const Tensor& phik, const Tensor& vp, const Tensor& M) {
  Causal cz;
  cz.L = phiq.size(2);
  cz.C = std::min<int64_t>(kChunk, cz.L);
  cz.NC = (cz.L + cz.C - 1) / cz.C;
  const int64_t B = phiq.size(0), H = phiq.size(1), NC = cz.NC, C = cz.C;
  cz.qc = pad_chunks(phiq, NC, C);
  cz.kc = pad_chunks(phik, NC, C);
  cz.vc = pad_chunks(vp, NC, C);
  cz.decay = M.defined();
  Tensor upper = at::ones({C, C}, phiq.options().dtype(at::kBool)).triu_(1);
  if (cz.decay) {
    // pad the running max by repeating its last value (keeps it non-decreasing)
    const int64_t Lp = NC * C;
    Tensor Mp = Lp == cz.L ? M : at::cat({M, M.narrow(2, cz.L - 1, 1).expand({B, H, Lp - cz.L})}, 2);
    Tensor Mc = Mp.reshape({B, H, NC, C});
    // D[t, s] = exp(M_s - M_t) for s <= t (<= 1), 0 above the diagonal
    cz.D = (Mc.unsqueeze(-2) - Mc.unsqueeze(-1)).masked_fill_(upper, -INFINITY).exp_();
    cz.Rc = Mc.select(-1, C - 1);
    cz.Rprev = at::cat({Mc.select(-1, 0).narrow(-1, 0, 1), cz.Rc.narrow(-1, 0, NC - 1)}, -1);
    cz.facq = (cz.Rprev.unsqueeze(-1) - Mc).exp_().unsqueeze(-1);
    cz.ek = (Mc - cz.Rc.unsqueeze(-1)).exp_().unsqueeze(-1);
    cz.kd = cz.kc * cz.ek;
  } else {
    cz.D = upper;
    cz.kd = cz.kc;
  }
  cz.A = apply_intra_mask(at::matmul(cz.qc, cz.kc.transpose(-2, -1)), cz);
  return cz;
}

// numerator|denominator (B,H,L,dv+1). keep_states records S_{c-1} per chunk in cz.states for
// the backward. On CPU the inter-chunk state S (B,H,m,dv+1) is streamed chunk by chunk (no
// O(L·m·dv) intermediate, which costs more than the GEMMs there); on GPUs, where one launch per
// chunk would dominate, the per-chunk increments, the scan and the query product are batched.
Tensor causal_forward(Causal& cz, bool keep_states) {
  Tensor outp = at::matmul(cz.A, cz.vc);  // intra-chunk part, (B,H,NC,C,dv+1)
  const int64_t B = outp.size(0), H = outp.size(1), NC = cz.NC, C = cz.C;
  const int64_t m = cz.qc.size(-1), dv1 = cz.vc.size(-1);
  if (NC > 1 && !outp.device().is_cpu()) {
    Tensor states = chunk_scan(at::matmul(cz.kd.transpose(-2, -1), cz.vc), cz, /*forward=*/true);
    Tensor inter = at::matmul(cz.qc, states);
    if (cz.decay) inter.mul_(cz.facq);
    outp.add_(inter);
    if (keep_states) cz.states = states;
  } else if (NC > 1) {
    Tensor S = at::zeros({B * H, m, dv1}, outp.options());
    Tensor inter = at::empty({B * H, C, dv1}, outp.options());
    if (keep_states) cz.states = at::empty({B, H, NC, m, dv1}, outp.options());
    Tensor ratio = cz.decay ? (cz.Rprev - cz.Rc).exp_().reshape({B * H, NC, 1, 1}) : Tensor();
    auto chunk = [&](const Tensor& t, int64_t c) { return t.select(2, c).reshape({B * H, C, t.size(-1)}); };
    for (int64_t c = 0; c < NC; ++c) {
      if (keep_states) cz.states.select(2, c).copy_(S.view({B, H, m, dv1}));
      if (c > 0) {
        at::bmm_out(inter, chunk(cz.qc, c), S);
        if (cz.decay) inter.mul_(chunk(cz.facq, c));
        outp.select(2, c).add_(inter.view({B, H, C, dv1}));
      }
      if (c + 1 < NC) {
        if (cz.decay) S.mul_(ratio.select(1, c));  // reference Rprev_c -> R_c
        S.baddbmm_(chunk(cz.kd, c).transpose(1, 2), chunk(cz.vc, c));
      }
    }
  }
  return outp.reshape({B, H, NC * C, dv1}).narrow(2, 0, cz.L);
}

// Given G = dL/d[num|den] per query (B,H,L,dv+1): gradients w.r.t. phi_q, phi_k, [v|1].
std::tuple<Tensor, Tensor, Tensor> causal_backward(const Causal& cz, const Tensor& G) {
  Tensor Gc = pad_chunks(G, cz.NC, cz.C);
  Tensor dA = apply_intra_mask(at::matmul(Gc, cz.vc.transpose(-2, -1)), cz);
  Tensor dq = at::matmul(dA, cz.kc);
  Tensor dk = at::matmul(dA.transpose(-2, -1), cz.qc);
  Tensor dvp = at::matmul(cz.A.transpose(-2, -1), Gc);
  if (cz.NC > 1) {
    Tensor dqi = at::matmul(Gc, cz.states.transpose(-2, -1));
    if (cz.decay) dqi.mul_(cz.facq);
    dq.add_(dqi);
    Tensor qd = cz.decay ? cz.qc * cz.facq : cz.qc;
    Tensor dP = at::matmul(qd.transpose(-2, -1), Gc);  // per-chunk phi_q^T G
    Tensor P = chunk_scan(dP, cz, /*forward=*/false);  // sums over later chunks
    Tensor dki = at::matmul(cz.vc, P.transpose(-2, -1));
    if (cz.decay) dki.mul_(cz.ek);
    dk.add_(dki);
    dvp.add_(at::matmul(cz.kd, P));
  }
  auto unpad = [&](const Tensor& t) {
    return t.reshape({t.size(0), t.size(1), cz.NC * cz.C, t.size(-1)}).narrow(2, 0, cz.L);
  };
  return {unpad(dq), unpad(dk), unpad(dvp)};
}

// ---------------------------------------------------------------------------------------------
// The ops.

// The forward pass, shared by the op and its backward (which recomputes it rather than saving
// O(L·m) features): features, [v|1], and num|den in one product (non-causal through the state kv).
struct Pass {
  Tensor W, vp, kv, outp;
  Features fq, fk;
  Causal cz;
  double alpha = 0.0;
};

Pass forward_pass(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& projection, Kernel kern,
                  bool causal, std::optional<double> scale, const std::optional<Tensor>& key_padding_mask,
                  bool for_backward) {
  Pass p;
  const auto ct = compute_type(q);
  p.W = projection.to(ct);
  p.alpha = feature_alpha(scale, q.size(3));
  p.fq = query_features(q.to(ct), p.W, kern, p.alpha);
  p.fk = key_features(k.to(ct), p.W, kern, p.alpha, causal, get_mask(key_padding_mask));
  p.vp = append_ones(v.to(ct));
  if (causal) {
    p.cz = causal_prepare(p.fq.phi, p.fk.phi, p.vp, p.fk.M);
    p.outp = causal_forward(p.cz, /*keep_states=*/for_backward);
  } else {
    p.kv = at::matmul(p.fk.phi.transpose(-2, -1), p.vp);
    p.outp = at::matmul(p.fq.phi, p.kv);
  }
  return p;
}

Tensor rf_attention_impl(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& projection,
                         c10::string_view kernel_fn, bool causal, std::optional<double> scale,
                         const std::optional<Tensor>& key_padding_mask) {
  const Kernel kern = parse_kernel(kernel_fn);
  check_inputs(q, k, v, projection, causal, scale, key_padding_mask);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), S = k.size(2), dv = v.size(3);
  if (B * H * Lq * dv == 0 || S == 0) return at::zeros({B, H, Lq, dv}, q.options());
  const Pass p = forward_pass(q, k, v, projection, kern, causal, scale, key_padding_mask,
                              /*for_backward=*/false);
  Tensor out = p.outp.narrow(-1, 0, dv) * safe_inverse(p.outp.narrow(-1, dv, 1));
  return out.to(q.scalar_type()).contiguous();
}

std::tuple<Tensor, Tensor, Tensor, Tensor> rf_attention_backward_impl(
    const Tensor& grad_out, const Tensor& q, const Tensor& k, const Tensor& v,
    const Tensor& projection, c10::string_view kernel_fn, bool causal,
    std::optional<double> scale, const std::optional<Tensor>& key_padding_mask,
    bool projection_grad) {
  const Kernel kern = parse_kernel(kernel_fn);
  check_inputs(q, k, v, projection, causal, scale, key_padding_mask);
  const int64_t B = q.size(0), H = q.size(1), Lq = q.size(2), S = k.size(2), dv = v.size(3);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == H &&
                        grad_out.size(2) == Lq && grad_out.size(3) == dv,
                    "rf_attention_backward: grad_out must have shape (B, H, Lq, dv)");
  if (B * H * Lq * dv == 0 || S == 0) {
    return {at::zeros(q.sizes(), q.options()), at::zeros(k.sizes(), k.options()),
            at::zeros(v.sizes(), v.options()), at::zeros(projection.sizes(), projection.options())};
  }
  // recompute features and the forward (den and the chunk states are needed; nothing O(L m)
  // is saved by the forward)
  const Pass p = forward_pass(q, k, v, projection, kern, causal, scale, key_padding_mask,
                              /*for_backward=*/true);
  const Tensor &W = p.W, &vp = p.vp, &kv = p.kv, &outp = p.outp;
  const Features &fq = p.fq, &fk = p.fk;
  const Causal& cz = p.cz;
  const double alpha = p.alpha;
  Tensor g = grad_out.to(W.scalar_type());
  // out = num / den:  dL/dnum = g / den,  dL/dden = -(g . out) / den
  Tensor inv = safe_inverse(outp.narrow(-1, dv, 1));
  Tensor o = outp.narrow(-1, 0, dv) * inv;
  Tensor G = at::cat({g * inv, -(g * o).sum(-1, true) * inv}, -1);

  Tensor dphiq, dphik, dvp;
  if (causal) {
    std::tie(dphiq, dphik, dvp) = causal_backward(cz, G);
  } else {
    dphiq = at::matmul(G, kv.transpose(-2, -1));
    Tensor dkv = at::matmul(fq.phi.transpose(-2, -1), G);
    dphik = at::matmul(vp, dkv.transpose(-2, -1));
    dvp = at::matmul(fk.phi, dkv);
  }
  Tensor dW;
  if (projection_grad) dW = at::zeros_like(W);
  Tensor dq = feature_backward(dphiq, fq, W, kern, alpha, projection_grad ? &dW : nullptr);
  Tensor dk = feature_backward(dphik, fk, W, kern, alpha, projection_grad ? &dW : nullptr);
  Tensor dproj = projection_grad ? dW.to(projection.scalar_type())
                                 : at::zeros(projection.sizes(), projection.options());
  // all outputs contiguous (the fake kernels promise that)
  return {dq.to(q.scalar_type()).contiguous(), dk.to(k.scalar_type()).contiguous(),
          dvp.narrow(-1, 0, dv).to(v.scalar_type()).contiguous(), dproj.contiguous()};
}

// SRPE filter: out[b,n,h,r] = sum_{i,j} x[b,n,h,i] * omega[n,h,i,j] * weight[h,i,j,r].
// Two routes to it, both chunked over positions (never (B, L, H, d, R), never the full (L, H, d, R)):
//   codes:  the positional codes omega·W of a block, (P, H, d, R), built once for the whole batch,
//           then one (B × d)·(d × R) product per position and head;
//   direct: z = x ⊙ omega of a block, (B, P, H, d, J), then one (B·P × d·J)·(d·J × R) GEMM per head.
// direct holds B·J values per (position, feature) where codes hold R, and it multiplies in large
// GEMMs instead of one small product per position: it serves B·J <= R (e.g. one long sequence).
void check_srpe(const Tensor& x, const Tensor& omega, const Tensor& weight) {
  TORCH_CHECK_VALUE(x.dim() == 4 && omega.dim() == 4 && weight.dim() == 4,
                    "srpe_filter: expected x (B, L, H, d), omega (L, H, d, J), weight (H, d, J, R);"
                    " got ", x.sizes(), ", ", omega.sizes(), ", ", weight.sizes());
  TORCH_CHECK_VALUE(omega.size(0) == x.size(1) && omega.size(1) == x.size(2) &&
                        omega.size(2) == x.size(3) && weight.size(0) == x.size(2) &&
                        weight.size(1) == x.size(3) && weight.size(2) == omega.size(3),
                    "srpe_filter: inconsistent shapes x ", x.sizes(), ", omega ", omega.sizes(),
                    ", weight ", weight.sizes());
  TORCH_CHECK_TYPE(at::isFloatingType(x.scalar_type()) && x.scalar_type() == omega.scalar_type() &&
                       x.scalar_type() == weight.scalar_type(),
                   "srpe_filter: x, omega, weight must share one floating dtype");
}

bool srpe_direct(const Tensor& x, const Tensor& weight) {
  return x.size(0) * weight.size(2) <= weight.size(3);
}

// positions per block: the block's largest intermediate (codes or z) within kSrpeBudget elements
int64_t srpe_block(const Tensor& x, const Tensor& weight) {
  const int64_t per_feature = srpe_direct(x, weight) ? x.size(0) * weight.size(2) : weight.size(3);
  const int64_t per_pos = std::max<int64_t>(1, x.size(2) * x.size(3) * per_feature);
  const int64_t budget = x.is_cuda() ? kSrpeBudgetCuda : kSrpeBudget;
  return std::max<int64_t>(1, std::min<int64_t>(x.size(1), budget / per_pos));
}

// z = x ⊙ omega of a block as (H, B*P, d*J): x (B, P, H, d), om (P, H, d, J)
Tensor srpe_products(const Tensor& xb, const Tensor& om) {
  const int64_t B = xb.size(0), P = xb.size(1), H = xb.size(2), d = xb.size(3), J = om.size(3);
  return (xb.unsqueeze(-1) * om.unsqueeze(0)).permute({2, 0, 1, 3, 4}).reshape({H, B * P, d * J});
}

// positional codes of positions [n0, n0+P): (P*H, d, R)
Tensor srpe_codes(const Tensor& om, const Tensor& w) {
  const int64_t P = om.size(0), H = om.size(1), d = om.size(2), J = om.size(3), R = w.size(3);
  Tensor o = om.permute({1, 2, 0, 3}).reshape({H * d, P, J});
  Tensor bar = at::bmm(o, w.reshape({H * d, J, R}));  // (H*d, P, R)
  return bar.view({H, d, P, R}).permute({2, 0, 1, 3}).reshape({P * H, d, R});
}

Tensor srpe_filter_impl(const Tensor& x, const Tensor& omega, const Tensor& weight) {
  check_srpe(x, omega, weight);
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), R = weight.size(3);
  const auto ct = compute_type(x);
  Tensor out = at::empty({B, L, H, R}, x.options().dtype(ct));
  if (out.numel() == 0 || x.size(3) == 0 || omega.size(3) == 0) {
    return out.zero_().to(x.scalar_type());
  }
  const Tensor xc = x.to(ct), oc = omega.to(ct), wc = weight.to(ct);
  const int64_t Pb = srpe_block(x, weight), d = x.size(3), J = omega.size(3);
  const bool direct = srpe_direct(x, weight);
  for (int64_t n0 = 0; n0 < L; n0 += Pb) {
    const int64_t P = std::min(Pb, L - n0);
    if (direct) {
      Tensor z = srpe_products(xc.narrow(1, n0, P), oc.narrow(0, n0, P));   // (H, B*P, d*J)
      Tensor ob = at::bmm(z, wc.reshape({H, d * J, R}));                     // (H, B*P, R)
      out.narrow(1, n0, P).copy_(ob.view({H, B, P, R}).permute({1, 2, 0, 3}));
      continue;
    }
    Tensor bar = srpe_codes(oc.narrow(0, n0, P), wc);                        // (P*H, d, R)
    Tensor xb = xc.narrow(1, n0, P).permute({1, 2, 0, 3}).reshape({P * H, B, d});
    Tensor ob = at::bmm(xb, bar);                                            // (P*H, B, R)
    out.narrow(1, n0, P).copy_(ob.view({P, H, B, R}).permute({2, 0, 1, 3}));
  }
  return out.to(x.scalar_type());
}

std::tuple<Tensor, Tensor, Tensor> srpe_filter_backward_impl(const Tensor& grad_out,
                                                             const Tensor& x, const Tensor& omega,
                                                             const Tensor& weight,
                                                             std::array<bool, 3> output_mask) {
  check_srpe(x, omega, weight);
  const int64_t B = x.size(0), L = x.size(1), H = x.size(2), d = x.size(3);
  const int64_t J = omega.size(3), R = weight.size(3);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == B && grad_out.size(1) == L &&
                        grad_out.size(2) == H && grad_out.size(3) == R,
                    "srpe_filter_backward: grad_out must have shape (B, L, H, R)");
  const auto ct = compute_type(x);
  Tensor dx = at::zeros(x.sizes(), x.options().dtype(ct));
  Tensor dom = at::zeros(omega.sizes(), omega.options().dtype(ct));
  Tensor dw = at::zeros({H * d, J, R}, weight.options().dtype(ct));
  const bool want_codes = output_mask[1] || output_mask[2];
  if (x.numel() > 0 && J > 0 && R > 0 && (output_mask[0] || want_codes)) {
    const Tensor xc = x.to(ct), oc = omega.to(ct), wc = weight.to(ct), g = grad_out.to(ct);
    const Tensor w3 = wc.reshape({H * d, J, R});
    const int64_t Pb = srpe_block(x, weight);
    const bool direct = srpe_direct(x, weight);
    for (int64_t n0 = 0; n0 < L; n0 += Pb) {
      const int64_t P = std::min(Pb, L - n0);
      Tensor om = oc.narrow(0, n0, P);
      if (direct) {
        Tensor xb = xc.narrow(1, n0, P);                                     // (B, P, H, d)
        Tensor gh = g.narrow(1, n0, P).permute({2, 0, 1, 3}).reshape({H, B * P, R});
        if (output_mask[0] || output_mask[1]) {
          Tensor dz = at::bmm(gh, wc.reshape({H, d * J, R}).transpose(1, 2))  // (H, B*P, d*J)
                          .view({H, B, P, d, J}).permute({1, 2, 0, 3, 4});    // (B, P, H, d, J)
          if (output_mask[0]) {
            dx.narrow(1, n0, P).copy_((dz * om.unsqueeze(0)).sum(-1));
          }
          if (output_mask[1]) {
            dom.narrow(0, n0, P).copy_((dz * xb.unsqueeze(-1)).sum(0));
          }
        }
        if (output_mask[2]) {
          dw.view({H, d * J, R}).add_(at::bmm(srpe_products(xb, om).transpose(1, 2), gh));
        }
        continue;
      }
      Tensor gb = g.narrow(1, n0, P).permute({1, 2, 0, 3}).reshape({P * H, B, R});
      if (output_mask[0]) {
        Tensor bar = srpe_codes(om, wc);                                     // (P*H, d, R)
        Tensor dxb = at::bmm(gb, bar.transpose(1, 2));                       // (P*H, B, d)
        dx.narrow(1, n0, P).copy_(dxb.view({P, H, B, d}).permute({2, 0, 1, 3}));
      }
      if (want_codes) {
        Tensor xb = xc.narrow(1, n0, P).permute({1, 2, 3, 0}).reshape({P * H, d, B});
        Tensor dbar = at::bmm(xb, gb);                                       // (P*H, d, R)
        dbar = dbar.view({P, H, d, R}).permute({1, 2, 0, 3}).reshape({H * d, P, R});
        if (output_mask[1]) {
          Tensor domb = at::bmm(dbar, w3.transpose(1, 2));                   // (H*d, P, J)
          dom.narrow(0, n0, P).copy_(domb.view({H, d, P, J}).permute({2, 0, 1, 3}));
        }
        if (output_mask[2]) {
          Tensor o = om.permute({1, 2, 3, 0}).reshape({H * d, J, P});
          dw.add_(at::bmm(o, dbar));                                         // (H*d, J, R)
        }
      }
    }
  }
  return {dx.to(x.scalar_type()), dom.to(omega.scalar_type()),
          dw.view({H, d, J, R}).to(weight.scalar_type())};  // all contiguous
}

// ---------------------------------------------------------------------------------------------
// Autocast: cast the floating inputs to the autocast dtype, then redispatch below autocast.

template <c10::DeviceType DT>
Tensor cast_ac(const Tensor& t) {
  return at::autocast::cached_cast(at::autocast::get_autocast_dtype(DT), t, DT);
}

template <c10::DeviceType DT>
Tensor rf_attention_autocast(const Tensor& q, const Tensor& k, const Tensor& v,
                             const Tensor& projection, c10::string_view kernel_fn, bool causal,
                             std::optional<double> scale,
                             const std::optional<Tensor>& key_padding_mask) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::rf_attention", "")
                       .typed<decltype(rf_attention_impl)>();
  return op.call(cast_ac<DT>(q), cast_ac<DT>(k), cast_ac<DT>(v), cast_ac<DT>(projection),
                 kernel_fn, causal, scale, key_padding_mask);
}

template <c10::DeviceType DT>
Tensor srpe_filter_autocast(const Tensor& x, const Tensor& omega, const Tensor& weight) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::srpe_filter", "")
                       .typed<decltype(srpe_filter_impl)>();
  return op.call(cast_ac<DT>(x), cast_ac<DT>(omega), cast_ac<DT>(weight));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(panther, m) {
  m.def(
      "rf_attention(Tensor q, Tensor k, Tensor v, Tensor projection, str kernel_fn, bool causal, "
      "float? scale, Tensor? key_padding_mask) -> Tensor");
  m.def(
      "rf_attention_backward(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor projection, "
      "str kernel_fn, bool causal, float? scale, Tensor? key_padding_mask, bool projection_grad) "
      "-> (Tensor, Tensor, Tensor, Tensor)");
  m.def("srpe_filter(Tensor x, Tensor omega, Tensor weight) -> Tensor");
  m.def(
      "srpe_filter_backward(Tensor grad_out, Tensor x, Tensor omega, Tensor weight, "
      "bool[3] output_mask) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(panther, CPU, m) {
  m.impl("rf_attention", &rf_attention_impl);
  m.impl("rf_attention_backward", &rf_attention_backward_impl);
  m.impl("srpe_filter", &srpe_filter_impl);
  m.impl("srpe_filter_backward", &srpe_filter_backward_impl);
}

TORCH_LIBRARY_IMPL(panther, CUDA, m) {
  m.impl("rf_attention", &rf_attention_impl);
  m.impl("rf_attention_backward", &rf_attention_backward_impl);
  m.impl("srpe_filter", &srpe_filter_impl);
  m.impl("srpe_filter_backward", &srpe_filter_backward_impl);
}

TORCH_LIBRARY_IMPL(panther, AutocastCPU, m) {
  m.impl("rf_attention", &rf_attention_autocast<c10::DeviceType::CPU>);
  m.impl("srpe_filter", &srpe_filter_autocast<c10::DeviceType::CPU>);
}

TORCH_LIBRARY_IMPL(panther, AutocastCUDA, m) {
  m.impl("rf_attention", &rf_attention_autocast<c10::DeviceType::CUDA>);
  m.impl("srpe_filter", &srpe_filter_autocast<c10::DeviceType::CUDA>);
}
