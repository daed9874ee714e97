// Fused CPU kernels of the SDN sweep (napari_sdunet/models/sweep_cpp.py builds and loads this file).
//
// Same maths as sweep_fast.py: per step, the GEMMs go to ATen (MKL / oneDNN, AMX where present)
// and all gate arithmetic of a step runs in one pass over the line (vectorised with AVX-512 when the
// compiler targets it), instead of ~7 eager ATen passes forward and ~13 backward. The whole loop runs
// here, so Python is called once per sweep, not once per op.
//
// Layout: lines-major x (T, B, L, S), M = B*L rows per step. The output lives in a zero-padded buffer
// (T, B, L+2, S) so the 3 taps of a cell are 3S contiguous values of the previous line.
// In low-precision mode ("lp") the GEMM operands are bfloat16 (accumulation in fp32 inside the GEMM),
// the state, gates, biases and bias gradients fp32; a bf16 copy of the state is written once, in the
// gate pass, where the next step reads it as a GEMM operand (no per-step conversion op).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/InferenceMode.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <mutex>
#include <tuple>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__)
#include <immintrin.h>
#define SDN_AVX512 1
#endif

namespace {

using bf16 = c10::BFloat16;

// ---- buffer pool
// The sweep's big buffers (state, saved backward factors, dx: hundreds of MB at 96x96, B=20) are the
// same sizes at every training step. Fresh ones come from mmap and page-fault on first touch, which
// measured as most of the forward's non-GEMM time; so they are kept here and handed out again once
// nothing else refers to their storage. Bounded by NAPARI_SDUNET_SWEEP_POOL_MB (default 8192).

struct Pool {
  std::mutex mu;
  std::vector<at::Tensor> items;
  int64_t bytes = 0;
};

Pool& pool() {
  static Pool p;
  return p;
}

int64_t pool_cap() {
  static const int64_t cap = [] {
    const char* e = std::getenv("NAPARI_SDUNET_SWEEP_POOL_MB");
    return (e ? std::atoll(e) : 8192LL) << 20;
  }();
  return cap;
}

at::Tensor pooled_empty(at::IntArrayRef shape, const at::TensorOptions& opt) {
  int64_t n = 1;
  for (auto d : shape) n *= d;
  const int64_t nbytes = n * static_cast<int64_t>(c10::elementSize(c10::typeMetaToScalarType(opt.dtype())));
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  // a buffer made under torch.inference_mode is an inference tensor: it may only be handed out again
  // in inference mode (and a normal one only outside), else autograd refuses it (segment, then fine-tune)
  const bool inference = c10::InferenceMode::is_enabled();
  for (auto& t : p.items) {
    if (t.storage().use_count() == 1 && t.dtype() == opt.dtype() && t.is_inference() == inference &&
        t.numel() >= n && t.numel() <= n + n / 4)
      return t.narrow(0, 0, n).view(shape);
  }
  at::Tensor t = at::empty({n}, opt);
  if (p.bytes + nbytes > pool_cap()) {  // make room: drop free entries
    std::vector<at::Tensor> keep;
    for (auto& e : p.items) {
      if (e.storage().use_count() == 1) p.bytes -= e.nbytes();
      else keep.push_back(e);
    }
    p.items.swap(keep);
  }
  if (p.bytes + nbytes <= pool_cap()) {
    p.items.push_back(t);
    p.bytes += nbytes;
  }
  return t.view(shape);
}

// A contiguous copy of any (strided) tensor into a pooled buffer, converted to `dtype` on the way:
// the sweep's input lines (a permuted view of the NCHW / channels_last state) and its gradient.
at::Tensor pooled_copy(const at::Tensor& t, at::ScalarType dtype) {
  at::Tensor out = pooled_empty(t.sizes(), t.options().dtype(dtype));
  out.copy_(t);
  return out;
}

int64_t clear_pool() {
  Pool& p = pool();
  std::lock_guard<std::mutex> g(p.mu);
  const int64_t freed = p.bytes;
  p.items.clear();
  p.bytes = 0;
  return freed;
}

// ---- GEMM back ends
// Y = X W^T. ATen's mm goes to MKL for fp32; on AMD CPUs MKL runs its AVX2 kernels (about 90
// GFLOP/s per core here) while oneDNN's matmul (mkldnn::_linear_pointwise, what Inductor uses)
// runs AVX-512 (about 190). Python measures both once per host (sweep_fast.fp32_gemm_backend)
// and passes the choice as `dnnl`. bf16 operands always go through at::mm, which uses oneDNN.

at::Tensor linear_dnnl(const at::Tensor& X, const at::Tensor& W) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  return op.call(X, W, std::nullopt, "none", c10::List<std::optional<at::Scalar>>(), std::nullopt);
}

// ---- element access policies: one kernel source, scalar (double, portable float) or AVX-512 float

struct ScalarD {
  using v = double;
  static constexpr int W = 1;
  static v load(const double* p, int) { return *p; }
  static void store(double* p, v x, int) { *p = x; }
  static void store(bf16* p, v x, int) { *p = bf16(static_cast<float>(x)); }
  static v set1(double x) { return x; }
  static v rcp(v x) { return 1 / x; }
  static v exp(v x) { return std::exp(x); }
  static v tanh(v x) { return std::tanh(x); }
};

struct ScalarF {
  using v = float;
  static constexpr int W = 1;
  static v load(const float* p, int) { return *p; }
  static v load(const bf16* p, int) { return static_cast<float>(*p); }
  static void store(float* p, v x, int) { *p = x; }
  static void store(bf16* p, v x, int) { *p = bf16(x); }
  static v set1(float x) { return x; }
  static v rcp(v x) { return 1 / x; }
  static v exp(v x) { return std::exp(x); }
  static v tanh(v x) { return std::tanh(x); }
};

#ifdef SDN_AVX512
struct Avx512 {
  using v = __m512;
  static constexpr int W = 16;
  static __mmask16 mask(int n) { return n >= 16 ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << n) - 1); }
  static v load(const float* p, int n) { return _mm512_maskz_loadu_ps(mask(n), p); }
  static v load(const bf16* p, int n) {
    __m256i h = _mm256_maskz_loadu_epi16(mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  }
  static void store(float* p, v x, int n) { _mm512_mask_storeu_ps(p, mask(n), x); }
  static void store(bf16* p, v x, int n) {  // round to nearest even, as torch's float -> bfloat16
    __m512i b = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF)));
    _mm256_mask_storeu_epi16(p, mask(n), _mm512_cvtepi32_epi16(_mm512_srli_epi32(b, 16)));
  }
  static v set1(float x) { return _mm512_set1_ps(x); }
  // 1 / x: the 14-bit estimate and one Newton step (~1 ulp), 4 cheap ops instead of a 16-cycle divide
  static v rcp(v x) {
    v r = _mm512_rcp14_ps(x);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(x, r, set1(2.0f)));
  }
  // exp: 2^k * e^r with |r| <= ln2/2, degree-7 Taylor polynomial (relative error ~1e-7)
  static v exp(v x) {
    x = _mm512_max_ps(_mm512_min_ps(x, set1(88.0f)), set1(-88.0f));
    v k = _mm512_roundscale_ps(_mm512_mul_ps(x, set1(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v r = _mm512_fnmadd_ps(k, set1(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(k, set1(1.42860682030941723e-6f), r);
    v p = set1(1.0f / 5040);
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 720));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, set1(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, set1(0.5f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f));
    p = _mm512_fmadd_ps(p, r, set1(1.0f));
    return _mm512_scalef_ps(p, k);
  }
  // tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|); below |x| = 0.3 an odd Taylor series to x^9 (error < 2e-8)
  static v tanh(v x) {
    v a = _mm512_abs_ps(x);
    v e = exp(_mm512_mul_ps(a, set1(-2.0f)));
    v big = _mm512_mul_ps(_mm512_sub_ps(set1(1.0f), e), rcp(_mm512_add_ps(set1(1.0f), e)));
    v a2 = _mm512_mul_ps(a, a);
    v s = set1(62.0f / 2835);
    s = _mm512_fmadd_ps(s, a2, set1(-17.0f / 315));
    s = _mm512_fmadd_ps(s, a2, set1(2.0f / 15));
    s = _mm512_fmadd_ps(s, a2, set1(-1.0f / 3));
    s = _mm512_fmadd_ps(s, a2, set1(1.0f));
    v small = _mm512_mul_ps(s, a);
    v y = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, set1(0.3f), _CMP_LT_OQ), big, small);
    // copy the sign of x
    return _mm512_castsi512_ps(_mm512_or_si512(_mm512_castps_si512(y),
        _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
  }
};
using FloatPolicy = Avx512;
#else
using FloatPolicy = ScalarF;
#endif

template <class P>
inline typename P::v sigmoid(typename P::v x) {
  return P::rcp(P::set1(1) + P::exp(P::set1(0) - x));
}

// ---- per-row kernels (a row = one cell's S features, for all gates)

// Forward gates of one cell. a, c: GEMM results (no bias); writes the new state s (and its bf16 copy)
// and, if sv, the 5 backward factors [z, r, 1 - n^2, (n - h) z (1 - z), c_n r (1 - r)].
// h: the cell's input (T, or bf16 where the caller's lines are bf16); out may be null (bf16 output only).
template <class P, class G, class T, class H>
inline void fwd_row(int S, const G* a, const G* c, const T* bin, const T* bh, const H* h, T* out, bf16* out_lp,
                    G* sv) {
  using V = typename P::v;
  const V one = P::set1(1);
  for (int j = 0; j < S; j += P::W) {
    const int n = S - j;
    V cr = P::load(c + j, n) + P::load(bh + j, n);
    V cz = P::load(c + S + j, n) + P::load(bh + S + j, n);
    V cn = P::load(c + 2 * S + j, n) + P::load(bh + 2 * S + j, n);
    V r = sigmoid<P>(P::load(a + j, n) + P::load(bin + j, n) + cr);
    V z = sigmoid<P>(P::load(a + S + j, n) + P::load(bin + S + j, n) + cz);
    V nn = P::tanh(P::load(a + 2 * S + j, n) + P::load(bin + 2 * S + j, n) + r * cn);
    V hv = P::load(h + j, n);
    V d = nn - hv;
    V s = hv + z * d;
    if (out) P::store(out + j, s, n);
    if (out_lp) P::store(out_lp + j, s, n);
    if (sv) {
      P::store(sv + j, z, n);
      P::store(sv + S + j, r, n);
      P::store(sv + 2 * S + j, one - nn * nn, n);
      P::store(sv + 3 * S + j, d * z * (one - z), n);
      P::store(sv + 4 * S + j, cn * r * (one - r), n);
    }
  }
}

// Backward gates of one cell: from the line gradient g, writes D = [da_n, da_r, da_z, dc_n] (the GEMM
// operand), the direct input gradient g (1 - z), and accumulates the bias gradients' row sums.
template <class P, class G, class T>
inline void bwd_row(int S, const T* g, const G* sv, G* D, T* dx, T* acc) {
  using V = typename P::v;
  for (int j = 0; j < S; j += P::W) {
    const int n = S - j;
    V gv = P::load(g + j, n);
    V z = P::load(sv + j, n);
    V r = P::load(sv + S + j, n);
    V dn = gv * z;
    V da_n = dn * P::load(sv + 2 * S + j, n);
    V da_z = gv * P::load(sv + 3 * S + j, n);
    V da_r = da_n * P::load(sv + 4 * S + j, n);
    V dc_n = da_n * r;
    P::store(dx + j, gv - dn, n);
    P::store(D + j, da_n, n);
    P::store(D + S + j, da_r, n);
    P::store(D + 2 * S + j, da_z, n);
    P::store(D + 3 * S + j, dc_n, n);
    P::store(acc + j, P::load(acc + j, n) + da_n, n);
    P::store(acc + S + j, P::load(acc + S + j, n) + da_r, n);
    P::store(acc + 2 * S + j, P::load(acc + 2 * S + j, n) + da_z, n);
    P::store(acc + 3 * S + j, P::load(acc + 3 * S + j, n) + dc_n, n);
  }
}

// Gradient of cell i of the previous line: its output gradient plus the 3 taps that read it
// (tap k of cell i' reads cell i' + k - 1). Optionally writes the line's input gradient: dx_in (the
// direct path) plus the prior-term input gradient dxp, into dx_out (in place when they are the same).
template <class P, class G, class T, class GR, class DX>
inline void prev_row(int S, int i, int L, const GR* grad, const G* du, T* g, const G* dxp, const T* dx_in,
                     DX* dx_out) {
  using V = typename P::v;
  const int S3 = 3 * S;
  for (int j = 0; j < S; j += P::W) {
    const int n = S - j;
    V v = P::load(grad + j, n) + P::load(du + S + j, n);
    if (i + 1 < L) v = v + P::load(du + S3 + j, n);
    if (i > 0) v = v + P::load(du - S3 + 2 * S + j, n);
    P::store(g + j, v, n);
    if (dxp) P::store(dx_out + j, P::load(dx_in + j, n) + P::load(dxp + j, n), n);
  }
}

// dst += src for an fp32 accumulator and a GEMM result in G (bf16 or float): one pass, where ATen's
// mixed-dtype add_ first converts src into a temporary (two passes and an allocation per step)
template <class P, class G>
void accumulate(float* dst, const G* src, int64_t n) {
  for (int64_t j = 0; j < n; j += P::W) {
    const int k = static_cast<int>(std::min<int64_t>(P::W, n - j));
    P::store(dst + j, P::load(dst + j, k) + P::load(src + j, k), k);
  }
}

// Copy the taps [p_{i-1}, p_i, p_{i+1}] of every cell of batch items [b0, b1) of a padded line (B, L+2, S)
// into u ((b1 - b0) * L, 3S).
template <class G>
void copy_taps(const G* line_pad, G* u, int64_t b0, int64_t b1, int64_t L, int64_t S) {
  at::parallel_for(0, (b1 - b0) * L, 256, [&](int64_t lo, int64_t hi) {
    for (int64_t m = lo; m < hi; ++m) {
      const int64_t b = b0 + m / L, i = m % L;
      std::memcpy(u + m * 3 * S, line_pad + (b * (L + 2) + i) * S, 3 * S * sizeof(G));
    }
  });
}

// Batch items per chunk of a step. A step's GEMM results and gate operands (M x 3S per matrix, 3.5 MB in
// fp32 at 96x96, B=20) do not fit the L2 cache, so an fp32 step runs in chunks of whole lines (the taps of a
// cell stay within its line): a chunk's GEMM results are still in cache when its gate pass reads them, and
// the chunk buffers are the same memory at every chunk and step (at 96x96 on a Zen 4 core: forward+backward
// from 69 to 82 % of the same-shape GEMM rate, benchmarks/bench_sdn.py). bf16 steps gain nothing (their gate pass is bound by writing the saved factors, which backward
// reads later) and run whole. NAPARI_SDUNET_SWEEP_CHUNK_ROWS overrides: rows (cells) per chunk, rounded
// to whole lines; 0 (or a negative or unreadable value) = one chunk, the whole step. By default steps of at
// most 512 rows run whole. (On the oneDNN path the GEMM results are fresh tensors, which malloc hands back
// from the same freed chunk-sized blocks.)
int64_t chunk_items(int64_t B, int64_t L, bool lp) {
  const char* e = std::getenv("NAPARI_SDUNET_SWEEP_CHUNK_ROWS");
  const int64_t rows = e ? std::atoll(e) : (lp ? 0 : 256);
  if (rows <= 0 || (!e && B * L <= 2 * rows)) return B;  // a small step fits the cache as it is
  return std::min<int64_t>(B, std::max<int64_t>(1, (rows + L / 2) / L));
}

template <class G>
at::ScalarType gtype() {
  if constexpr (std::is_same_v<G, bf16>) return at::kBFloat16;
  else if constexpr (std::is_same_v<G, float>) return at::kFloat;
  else return at::kDouble;
}

// ---- forward

// x: the lines (T, B, L, S), of type H. H = T: the usual case, output in T (fp32 / fp64), with a bf16 copy
// of the state in lp mode. H = bf16 (lp mode, the caller's lines are bf16, as under autocast): the
// lines are also the GEMM operand x_g, and the bf16 state is the output, so no fp32 copy of the input
// or of the output is made at all (values as before: the fp32 state rounded once, to nearest even).
template <class P, class G, class T, class H>
std::vector<at::Tensor> forward_impl(const at::Tensor& x, const at::Tensor& x_g, const at::Tensor& w_in,
                                     const at::Tensor& b_in, const at::Tensor& w_h, const at::Tensor& b_h,
                                     bool keep, bool dnnl) {
  const int64_t Tn = x.size(0), B = x.size(1), L = x.size(2), S = x.size(3), M = B * L, S3 = 3 * S;
  const bool lp = !std::is_same_v<G, T>;
  constexpr bool lp_out = std::is_same_v<H, bf16>;  // the bf16 state is the output
  auto fo = x.options().dtype(gtype<T>());
  auto go = fo.dtype(gtype<G>());
  at::Tensor out;
  if (!lp_out) {
    out = pooled_empty({Tn, B, L + 2, S}, fo);
    out.select(2, 0).zero_();
    out.select(2, L + 1).zero_();
    out.select(0, 0).narrow(1, 1, L).copy_(x.select(0, 0));
  }
  // bf16 copy of the padded state, read by the next step's tap GEMM (all steps kept for backward, or
  // when it is the output; else a ring of 2 lines)
  const bool ring = lp && !keep && !lp_out;
  at::Tensor out_lp;
  if (lp) {
    out_lp = pooled_empty({ring ? 2 : Tn, B, L + 2, S}, go);
    out_lp.select(2, 0).zero_();
    out_lp.select(2, L + 1).zero_();
    out_lp.select(0, 0).narrow(1, 1, L).copy_(x.select(0, 0));
  }
  at::Tensor res = lp_out ? out_lp : out;
  // in bf16 mode the factors are kept in bf16 too: they are read once, by backward, which is already
  // bf16-accurate; this halves the memory traffic that bounds the gate passes at 96x96
  at::Tensor saved = keep ? pooled_empty({std::max<int64_t>(Tn - 1, 0), M, 5 * S}, go) : at::Tensor();
  if (Tn == 1) return {res, lp ? out_lp : out, keep ? saved : res};
  const at::Tensor w_in_t = w_in.to(gtype<G>()).t().contiguous();
  const at::Tensor w_h_t = w_h.to(gtype<G>()).t().contiguous();
  const int64_t nb = chunk_items(B, L, lp), MC = nb * L;
  at::Tensor u = at::empty({MC, S3}, go), a = at::empty({MC, S3}, go), c = at::empty({MC, S3}, go);
  const T* bin = b_in.data_ptr<T>();
  const T* bh = b_h.data_ptr<T>();
  const G* gbase = lp ? out_lp.data_ptr<G>() : reinterpret_cast<const G*>(out.data_ptr<T>());
  const int64_t line_pad = B * (L + 2) * S;
  for (int64_t t = 1; t < Tn; ++t) {
    const int64_t src = ring ? (t - 1) % 2 : t - 1, dst = ring ? t % 2 : t;
    const H* hp = x.data_ptr<H>() + t * M * S;
    T* op = lp_out ? nullptr : out.data_ptr<T>() + t * line_pad;
    bf16* olp = lp ? reinterpret_cast<bf16*>(out_lp.data_ptr<G>()) + dst * line_pad : nullptr;
    G* svp = keep ? saved.data_ptr<G>() + (t - 1) * M * 5 * S : nullptr;
    const at::Tensor xt = x_g.select(0, t).view({M, S});
    for (int64_t b0 = 0; b0 < B; b0 += nb) {
      const int64_t b1 = std::min(B, b0 + nb), m0 = b0 * L, mc = (b1 - b0) * L;
      at::Tensor uc = u.narrow(0, 0, mc), ac = a.narrow(0, 0, mc), cc = c.narrow(0, 0, mc);
      copy_taps<G>(gbase + src * line_pad, uc.data_ptr<G>(), b0, b1, L, S);
      if (dnnl) {  // results are fresh tensors (oneDNN has no out=); same-size frees are reused by malloc
        cc = linear_dnnl(xt.narrow(0, m0, mc), w_h);
        ac = linear_dnnl(uc, w_in);
      } else {
        at::mm_out(cc, xt.narrow(0, m0, mc), w_h_t);
        at::mm_out(ac, uc, w_in_t);
      }
      const G* ap = ac.data_ptr<G>();  // row m of the step is row m - m0 of the chunk
      const G* cp = cc.data_ptr<G>();
      at::parallel_for(m0, m0 + mc, 64, [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m) {
          const int64_t b = m / L, i = m % L, o = (b * (L + 2) + i + 1) * S;
          fwd_row<P, G, T, H>(S, ap + (m - m0) * S3, cp + (m - m0) * S3, bin, bh, hp + m * S, op ? op + o : nullptr,
                              olp ? olp + o : nullptr, svp ? svp + m * 5 * S : nullptr);
        }
      });
    }
  }
  return {res, lp ? out_lp : out, keep ? saved : res};
}

// ---- backward

// bf16_io (lp mode, bf16 lines): the output gradient comes in bf16 and the input gradient goes out in
// bf16 (rounded once from fp32, as a conversion afterwards would), with no full-size fp32 copy of either.
template <class P, class G, class T, bool bf16_io = false>
std::vector<at::Tensor> backward_impl(const at::Tensor& grad, const at::Tensor& x_g, const at::Tensor& out_g,
                                      const at::Tensor& saved, const at::Tensor& w_in, const at::Tensor& w_h,
                                      bool need_w_in, bool need_w_h, bool dnnl) {
  using GR = std::conditional_t<bf16_io, bf16, T>;
  using DX = GR;
  const int64_t Tn = grad.size(0), B = grad.size(1), L = grad.size(2), S = grad.size(3), M = B * L, S3 = 3 * S;
  const bool lp = !std::is_same_v<G, T>;
  auto fo = grad.options().dtype(gtype<T>());
  auto go = fo.dtype(gtype<G>());
  at::Tensor dx = pooled_empty(grad.sizes(), grad.options());
  const int64_t nb = chunk_items(B, L, lp), MC = nb * L;
  at::Tensor dxs = bf16_io ? at::empty({MC, S}, fo) : at::Tensor();  // the direct path of a chunk, in fp32
  T* const dxs_p = bf16_io ? dxs.data_ptr<T>() : nullptr;
  at::Tensor dw_in_p = at::zeros({S3, S3}, fo);  // rows in the gate order of D: [n, r, z]
  at::Tensor dw_h = at::zeros({S3, S}, fo);
  const int nth = at::get_num_threads();
  // bias-gradient row sums: per thread within a step, then into a float64 total (1e-7, not 1e-6, error)
  at::Tensor acc = at::zeros({nth, 4 * S}, fo);
  at::Tensor acc_total = at::zeros({4 * S}, fo.dtype(at::kDouble));
  // W_in with its rows (gates) in D's order [n, r, z]: du = D[:, :3S] @ W_in_p, dx_prior = D[:, S:] @ W_h
  at::Tensor w_in_p = at::cat({w_in.narrow(0, 2 * S, S), w_in.narrow(0, 0, 2 * S)}, 0).to(gtype<G>()).contiguous();
  at::Tensor w_h_g = w_h.to(gtype<G>()).contiguous();
  // D = [da_n, da_r, da_z, dc_n] and the taps u of a whole step (the weight-gradient GEMMs run once per step:
  // per chunk their K would be small and their results summed once per chunk); du and the prior-term dx
  // per chunk (see chunk_items)
  at::Tensor D = at::empty({M, 4 * S}, go), u = at::empty({M, S3}, go), du = at::empty({MC, S3}, go);
  at::Tensor dxp = lp ? at::empty({MC, S}, go) : at::Tensor();
  // oneDNN computes X W^T: the weights it multiplies from the right, transposed once per call
  const at::Tensor w_in_pt = dnnl ? w_in_p.t().contiguous() : at::Tensor();
  const at::Tensor w_h_t = dnnl ? w_h_g.t().contiguous() : at::Tensor();
  at::Tensor tmp_in = lp ? at::empty({S3, S3}, go) : at::Tensor(), tmp_h = lp ? at::empty({S3, S}, go) : at::Tensor();
  at::Tensor g = at::empty({B, L, S}, fo);  // (B, L, S) total gradient of the current line
  g.copy_(grad.select(0, Tn - 1));
  const int64_t line_pad = B * (L + 2) * S;
  for (int64_t t = Tn - 1; t > 0; --t) {
    const T* gp = g.data_ptr<T>();
    const G* svp = saved.data_ptr<G>() + (t - 1) * M * 5 * S;
    DX* dxt = dx.data_ptr<DX>() + t * M * S;
    T* accp = acc.data_ptr<T>();
    const at::Tensor h_t = x_g.select(0, t).view({M, S});
    const GR* grp = grad.data_ptr<GR>() + (t - 1) * M * S;
    T* gw = g.data_ptr<T>();
    for (int64_t b0 = 0; b0 < B; b0 += nb) {
      // a chunk of whole lines: the taps that read a cell (prev_row) are in the same line
      const int64_t b1 = std::min(B, b0 + nb), m0 = b0 * L, mc = (b1 - b0) * L;
      const at::Tensor Dm = D.narrow(0, m0, mc), Da = Dm.narrow(1, 0, S3), Dc = Dm.narrow(1, S, S3);
      at::Tensor duc = du.narrow(0, 0, mc), dxpc = lp ? dxp.narrow(0, 0, mc) : dxp;
      G* Dp = D.data_ptr<G>();
      // where the direct path of row m goes: the fp32 scratch of the chunk, or dx itself
      auto dxd = [&](int64_t m) -> T* {
        if constexpr (bf16_io) return dxs_p + (m - m0) * S;
        else return dxt + m * S;
      };
      at::parallel_for(m0, m0 + mc, 64, [&](int64_t lo, int64_t hi) {
        T* ac = accp + at::get_thread_num() * 4 * S;
        for (int64_t m = lo; m < hi; ++m)
          bwd_row<P, G, T>(S, gp + m * S, svp + m * 5 * S, Dp + m * 4 * S, dxd(m), ac);
      });
      if (dnnl) {
        dxpc = linear_dnnl(Dc, w_h_t);
        duc = linear_dnnl(Da, w_in_pt);
      } else {
        if (lp) at::mm_out(dxpc, Dc, w_h_g);
        else dx.select(0, t).view({M, S}).narrow(0, m0, mc).addmm_(Dc, w_h_g);
        at::mm_out(duc, Da, w_in_p);
      }
      const G* dup = duc.data_ptr<G>();
      const G* dxpp = (lp || dnnl) ? dxpc.data_ptr<G>() : nullptr;
      at::parallel_for(m0, m0 + mc, 64, [&](int64_t lo, int64_t hi) {
        for (int64_t m = lo; m < hi; ++m)
          prev_row<P, G, T, GR, DX>(S, static_cast<int>(m % L), static_cast<int>(L), grp + m * S,
                                    dup + (m - m0) * S3, gw + m * S, dxpp ? dxpp + (m - m0) * S : nullptr, dxd(m),
                                    dxt + m * S);
      });
    }
    // the weight gradients of the step, over all its rows
    const at::Tensor Da = D.narrow(1, 0, S3), Dc = D.narrow(1, S, S3);
    if (need_w_in) copy_taps<G>(out_g.data_ptr<G>() + (t - 1) * line_pad, u.data_ptr<G>(), 0, B, L, S);
    if (dnnl) {
      if (need_w_h) dw_h.add_(linear_dnnl(Dc.t(), h_t.t()));
      if (need_w_in) dw_in_p.add_(linear_dnnl(Da.t(), u.t()));
    } else if constexpr (!std::is_same_v<G, T>) {
      if (need_w_h)
        accumulate<FloatPolicy, G>(dw_h.data_ptr<float>(), at::mm_out(tmp_h, Dc.t(), h_t).data_ptr<G>(), S3 * S);
      if (need_w_in)
        accumulate<FloatPolicy, G>(dw_in_p.data_ptr<float>(), at::mm_out(tmp_in, Da.t(), u).data_ptr<G>(), S3 * S3);
    } else {
      if (need_w_h) dw_h.addmm_(Dc.t(), h_t);
      if (need_w_in) dw_in_p.addmm_(Da.t(), u);
    }
    {  // the step's per-thread bias-gradient sums into the float64 total (a few hundred values)
      double* tot = acc_total.data_ptr<double>();
      for (int th = 0; th < nth; ++th) {
        T* a = accp + th * 4 * S;
        for (int64_t k = 0; k < 4 * S; ++k) {
          tot[k] += static_cast<double>(a[k]);
          a[k] = 0;
        }
      }
    }
  }
  dx.select(0, 0).copy_(g);
  at::Tensor a = acc_total.to(gtype<T>());  // [n, r, z, c_n]
  at::Tensor db_in = at::cat({a.narrow(0, S, 2 * S), a.narrow(0, 0, S)});
  at::Tensor db_h = at::cat({a.narrow(0, S, 2 * S), a.narrow(0, 3 * S, S)});
  at::Tensor dw_in = at::cat({dw_in_p.narrow(0, S, 2 * S), dw_in_p.narrow(0, 0, S)}, 0);
  return {dx, dw_in, db_in, dw_h, db_h};
}

// ---- entry points (registered as torch.ops.napari_sdunet_sweep.*)

std::vector<at::Tensor> sweep_forward(const at::Tensor& x, const at::Tensor& x_lp, const at::Tensor& w_in,
                                      const at::Tensor& b_in, const at::Tensor& w_h, const at::Tensor& b_h,
                                      bool keep, bool lp, bool dnnl) {
  TORCH_CHECK(x.dim() == 4 && x.is_contiguous() && x.device().is_cpu(), "sweep: x must be contiguous (T, B, L, S) on CPU");
  TORCH_CHECK(b_in.is_contiguous() && b_h.is_contiguous(), "sweep: biases must be contiguous");
  if (x.scalar_type() == at::kDouble) {
    TORCH_CHECK(!lp, "sweep: bf16 operands need float32 state");
    return forward_impl<ScalarD, double, double, double>(x, x, w_in, b_in, w_h, b_h, keep, false);
  }
  if (x.scalar_type() == at::kBFloat16) {  // bf16 lines: they are the GEMM operand, the output is bf16
    TORCH_CHECK(lp, "sweep: bf16 lines need bf16 operands (lp)");
    TORCH_CHECK(b_in.scalar_type() == at::kFloat && b_h.scalar_type() == at::kFloat, "sweep: float32 biases");
    return forward_impl<FloatPolicy, bf16, float, bf16>(x, x, w_in, b_in, w_h, b_h, keep, false);
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat, "sweep: float32, float64 or bfloat16 lines");
  if (lp) {
    TORCH_CHECK(x_lp.scalar_type() == at::kBFloat16 && x_lp.is_contiguous(), "sweep: x_lp must be contiguous bf16");
    return forward_impl<FloatPolicy, bf16, float, float>(x, x_lp, w_in, b_in, w_h, b_h, keep, false);
  }
  return forward_impl<FloatPolicy, float, float, float>(x, x, w_in, b_in, w_h, b_h, keep, dnnl);
}

std::vector<at::Tensor> sweep_backward(const at::Tensor& grad, const at::Tensor& x_g, const at::Tensor& out_g,
                                       const at::Tensor& saved, const at::Tensor& w_in, const at::Tensor& w_h,
                                       bool need_w_in, bool need_w_h, bool dnnl) {
  TORCH_CHECK(grad.is_contiguous() && x_g.is_contiguous() && out_g.is_contiguous() && saved.is_contiguous(),
              "sweep backward: contiguous tensors expected");
  if (grad.scalar_type() == at::kDouble)
    return backward_impl<ScalarD, double, double>(grad, x_g, out_g, saved, w_in, w_h, need_w_in, need_w_h, false);
  if (x_g.scalar_type() == at::kBFloat16 && grad.scalar_type() == at::kBFloat16)  // bf16 lines: bf16 in, bf16 out
    return backward_impl<FloatPolicy, bf16, float, true>(grad, x_g, out_g, saved, w_in, w_h, need_w_in, need_w_h, false);
  TORCH_CHECK(grad.scalar_type() != at::kBFloat16, "sweep backward: a bf16 gradient needs bf16 operands");
  if (x_g.scalar_type() == at::kBFloat16)
    return backward_impl<FloatPolicy, bf16, float>(grad, x_g, out_g, saved, w_in, w_h, need_w_in, need_w_h, false);
  return backward_impl<FloatPolicy, float, float>(grad, x_g, out_g, saved, w_in, w_h, need_w_in, need_w_h, dnnl);
}

bool simd() {
#ifdef SDN_AVX512
  return true;
#else
  return false;
#endif
}

}  // namespace

TORCH_LIBRARY(napari_sdunet_sweep, m) {
  m.def("forward", &sweep_forward);
  m.def("backward", &sweep_backward);
  m.def("simd", &simd);
  m.def("clear_pool", &clear_pool);
  m.def("pooled_copy", &pooled_copy);
}
