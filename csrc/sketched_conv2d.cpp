// panther::sketched_conv2d: one-sided sketched 2-D convolution.
//
//   out[b,o] = 1/(2L) * sum_{i<2L, r<k} U1s[i,r,o] * conv(x, S1s)[b, i*k+r] + bias[o]
//
// computed as ONE convolution with 2Lk output channels followed by a 1x1 channel mix with the
// small (C_out, 2Lk) matrix M = U1cat^T / (2L) (the 1/(2L) is folded into M, the bias into the
// same GEMM through addmm/baddbmm). The same ATen code runs on CPU and CUDA tensors.
// Memory format: a channels_last input gives a channels_last output (the channel mix is then a
// plain (pixels, 2Lk) x (2Lk, C_out) GEMM); anything else gives a contiguous NCHW output.
#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <optional>

namespace panther {
namespace {

// The layout decision shared with the fake kernel in panther/ops/conv.py (keep them identical).
bool wants_channels_last(const at::Tensor& x4) {
  return x4.is_contiguous(at::MemoryFormat::ChannelsLast) && !x4.is_contiguous();
}

void check_pair(c10::SymIntArrayRef v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 2, "sketched_conv2d: ", name, " must have 2 elements, got ", v.size());
}

at::Tensor sketched_conv2d_impl(const at::Tensor& x, const at::Tensor& S1s, const at::Tensor& U1s,
                                const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                                c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation) {
  TORCH_CHECK_VALUE(x.dim() == 3 || x.dim() == 4,
                    "sketched_conv2d: x must be (B, C_in, H, W) or unbatched (C_in, H, W), got ", x.dim(),
                    " dims");
  TORCH_CHECK_VALUE(S1s.dim() == 4, "sketched_conv2d: S1s must be (2Lk, C_in, kh, kw), got ", S1s.dim(), " dims");
  TORCH_CHECK_VALUE(U1s.dim() == 3, "sketched_conv2d: U1s must be (2L, k, C_out), got ", U1s.dim(), " dims");
  check_pair(stride, "stride");
  check_pair(padding, "padding");
  check_pair(dilation, "dilation");
  const int64_t two_l = U1s.size(0);
  const int64_t rank = U1s.size(0) * U1s.size(1);  // 2Lk
  const int64_t c_out = U1s.size(2);
  TORCH_CHECK_VALUE(two_l > 0 && rank > 0, "sketched_conv2d: U1s must have 2L > 0 and k > 0, got shape ",
                    U1s.sizes());
  TORCH_CHECK_VALUE(S1s.size(0) == rank, "sketched_conv2d: S1s.size(0) = ", S1s.size(0),
                    " must equal U1s.size(0) * U1s.size(1) = ", rank);
  const bool unbatched = x.dim() == 3;
  const at::Tensor x4 = unbatched ? x.unsqueeze(0) : x;
  TORCH_CHECK_VALUE(x4.size(1) == S1s.size(1), "sketched_conv2d: x has ", x4.size(1),
                    " input channels but S1s expects ", S1s.size(1));
  TORCH_CHECK_TYPE(x.scalar_type() == S1s.scalar_type() && x.scalar_type() == U1s.scalar_type(),
                   "sketched_conv2d: x, S1s and U1s must have the same dtype, got ", x.scalar_type(), ", ",
                   S1s.scalar_type(), ", ", U1s.scalar_type());
  const bool has_bias = bias.has_value() && bias->defined();
  if (has_bias) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == c_out, "sketched_conv2d: bias must be (C_out,) = (",
                      c_out, ",), got ", bias->sizes());
    TORCH_CHECK_TYPE(bias->scalar_type() == x.scalar_type(), "sketched_conv2d: bias dtype ", bias->scalar_type(),
                     " differs from x dtype ", x.scalar_type());
  }

  const bool cl = wants_channels_last(x4);
  at::Tensor z = at::convolution(x4, S1s, std::nullopt, C10_AS_INTARRAYREF_SLOW(stride),
                                 C10_AS_INTARRAYREF_SLOW(padding), C10_AS_INTARRAYREF_SLOW(dilation),
                                 /*transposed=*/false, /*output_padding=*/{0, 0}, /*groups=*/1);
  const int64_t batch = z.size(0), h_out = z.size(2), w_out = z.size(3);

  // M = U1cat^T / (2L), (C_out, 2Lk); tiny, so the scale costs nothing here.
  const at::Tensor m = U1s.reshape({rank, c_out}).t().div(static_cast<double>(two_l));

  at::Tensor out;
  if (cl) {
    // NHWC storage: pixels are rows, channels are columns -> one GEMM (bias broadcast over rows).
    const at::Tensor rows = z.contiguous(at::MemoryFormat::ChannelsLast).permute({0, 2, 3, 1}).reshape({-1, rank});
    const at::Tensor mixed = has_bias ? at::addmm(*bias, rows, m.t()) : at::mm(rows, m.t());
    out = mixed.view({batch, h_out, w_out, c_out}).permute({0, 3, 1, 2});
  } else {
    const at::Tensor z3 = z.contiguous().view({batch, rank, h_out * w_out});
    if (batch == 1) {
      const at::Tensor z2 = z3.select(0, 0);
      const at::Tensor mixed = has_bias ? at::addmm(bias->unsqueeze(1), m, z2) : at::mm(m, z2);
      out = mixed.view({1, c_out, h_out, w_out});
    } else {
      // M is broadcast over the batch with a stride-0 view (never materialised).
      const at::Tensor mb = m.unsqueeze(0).expand({batch, c_out, rank});
      const at::Tensor mixed =
          has_bias ? at::baddbmm(bias->view({1, c_out, 1}).expand({batch, c_out, h_out * w_out}), mb, z3)
                   : at::bmm(mb, z3);
      out = mixed.view({batch, c_out, h_out, w_out});
    }
  }
  return unbatched ? out.squeeze(0) : out;
}

// Autocast: run the op in the autocast dtype (inputs cast once, cached for weights).
at::Tensor sketched_conv2d_autocast(c10::DeviceType device_type, const at::Tensor& x, const at::Tensor& S1s,
                                    const at::Tensor& U1s, const std::optional<at::Tensor>& bias,
                                    c10::SymIntArrayRef stride, c10::SymIntArrayRef padding,
                                    c10::SymIntArrayRef dilation) {
  c10::impl::ExcludeDispatchKeyGuard guard(c10::autocast_dispatch_keyset);
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("panther::sketched_conv2d", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                         const std::optional<at::Tensor>&, c10::SymIntArrayRef,
                                         c10::SymIntArrayRef, c10::SymIntArrayRef)>();
  const auto dtype = at::autocast::get_autocast_dtype(device_type);
  return op.call(at::autocast::cached_cast(dtype, x, device_type), at::autocast::cached_cast(dtype, S1s, device_type),
                 at::autocast::cached_cast(dtype, U1s, device_type), at::autocast::cached_cast(dtype, bias, device_type),
                 stride, padding, dilation);
}

at::Tensor sketched_conv2d_autocast_cpu(const at::Tensor& x, const at::Tensor& S1s, const at::Tensor& U1s,
                                        const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                                        c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation) {
  return sketched_conv2d_autocast(c10::DeviceType::CPU, x, S1s, U1s, bias, stride, padding, dilation);
}

at::Tensor sketched_conv2d_autocast_cuda(const at::Tensor& x, const at::Tensor& S1s, const at::Tensor& U1s,
                                         const std::optional<at::Tensor>& bias, c10::SymIntArrayRef stride,
                                         c10::SymIntArrayRef padding, c10::SymIntArrayRef dilation) {
  return sketched_conv2d_autocast(c10::DeviceType::CUDA, x, S1s, U1s, bias, stride, padding, dilation);
}

}  // namespace
}  // namespace panther

TORCH_LIBRARY_FRAGMENT(panther, m) {
  m.def(
      "sketched_conv2d(Tensor x, Tensor S1s, Tensor U1s, Tensor? bias, SymInt[2] stride, SymInt[2] padding, "
      "SymInt[2] dilation) -> Tensor");
}

TORCH_LIBRARY_IMPL(panther, CPU, m) { m.impl("sketched_conv2d", &panther::sketched_conv2d_impl); }
TORCH_LIBRARY_IMPL(panther, CUDA, m) { m.impl("sketched_conv2d", &panther::sketched_conv2d_impl); }
TORCH_LIBRARY_IMPL(panther, AutocastCPU, m) { m.impl("sketched_conv2d", &panther::sketched_conv2d_autocast_cpu); }
TORCH_LIBRARY_IMPL(panther, AutocastCUDA, m) { m.impl("sketched_conv2d", &panther::sketched_conv2d_autocast_cuda); }
