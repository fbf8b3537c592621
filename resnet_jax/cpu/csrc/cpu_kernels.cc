// CPU kernels as XLA FFI handlers: 2-D float32 and bfloat16 convolutions through oneDNN, and the
// per-channel sums of BatchNorm.
//
// Convolutions: activations are NHWC and kernels HWIO, as in resnet_jax.models; oneDNN reads and
// writes the activations in place and reorders only the (small) kernels to its preferred blocked
// layout. Each handler is one primitive: the forward conv, the input gradient and the kernel
// gradient. Primitives are built once per shape and kept for the life of the process. XLA runs
// them from any of its threads, two at once at times, so each execution gets its scratchpad from
// the calling thread: oneDNN's own (library) scratchpad belongs to the thread that built the
// primitive and is not safe to share. Each primitive is built and run with one OpenMP thread
// count for the whole process, whatever the calling thread's own setting (see FixedThreads).
//
// Channel sums: sum(a) and sum(a * b) per channel of two [..., C] tensors in one pass, reading
// bfloat16 as it is (XLA:CPU writes a whole float32 copy of a bfloat16 tensor before reducing it).
//
// Whether oneDNN can build a conv's primitives depends on the CPU (bfloat16 needs AVX-512 on x86),
// so Python asks `ResnetJaxConvImplementations` once per conv shape before it uses the handlers.

#include <omp.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <unordered_map>
#include <vector>

#include "oneapi/dnnl/dnnl.hpp"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using dnnl::memory;
using Tag = memory::format_tag;

namespace {

dnnl::engine& Engine() {
  static dnnl::engine engine(dnnl::engine::kind::cpu, 0);
  return engine;
}

// OpenMP threads per conv: OMP_NUM_THREADS if set, else every processor this process may use.
int Threads() {
  static const int threads = [] {
    const char* env = std::getenv("OMP_NUM_THREADS");
    int count = env ? std::atoi(env) : 0;
    return count > 0 ? count : omp_get_num_procs();
  }();
  return threads;
}

// oneDNN splits a conv by the calling thread's OpenMP thread count when it builds the primitive,
// and the kernel gradient's sums with it: a thread on which a library (torch.set_num_threads)
// called omp_set_num_threads would build a primitive with other rounding. So every handler runs
// with Threads(), and the caller's own setting is restored afterwards.
class FixedThreads {
 public:
  FixedThreads() : saved_(omp_get_max_threads()) {
    if (saved_ != Threads()) omp_set_num_threads(Threads());
  }
  ~FixedThreads() {
    if (saved_ != Threads()) omp_set_num_threads(saved_);
  }

 private:
  int saved_;
};

// oneDNN's logical dims (NCHW, OIHW) of one conv, whatever the physical layout.
// One element type for all three tensors of a conv: float32 or bfloat16.
struct Geometry {
  memory::dims src, weights, dst, strides, pad_low, pad_high;
  memory::data_type type;

  std::string Key(char kind) const {
    std::string key(1, kind);
    key += std::to_string(static_cast<int>(type));
    for (const memory::dims* dims : {&src, &weights, &dst, &strides, &pad_low, &pad_high})
      for (memory::dim d : *dims) key += "," + std::to_string(d);
    return key;
  }
  memory::desc Src() const { return {src, type, Tag::nhwc}; }
  memory::desc Dst() const { return {dst, type, Tag::nhwc}; }
  memory::desc AnyWeights() const { return {weights, type, Tag::any}; }
  memory::desc UserWeights() const { return {weights, type, Tag::hwio}; }
};

// From NHWC x, HWIO w and NHWC y dims.
Geometry MakeGeometry(const int64_t* xd, const int64_t* wd, const int64_t* yd, bool bf16,
                      int64_t stride_h, int64_t stride_w, int64_t pad_h_lo, int64_t pad_h_hi,
                      int64_t pad_w_lo, int64_t pad_w_hi) {
  return Geometry{{xd[0], xd[3], xd[1], xd[2]}, {wd[3], wd[2], wd[0], wd[1]},
                  {yd[0], yd[3], yd[1], yd[2]}, {stride_h, stride_w},
                  {pad_h_lo, pad_w_lo},         {pad_h_hi, pad_w_hi},
                  bf16 ? memory::data_type::bf16 : memory::data_type::f32};
}

Geometry MakeGeometry(const ffi::AnyBuffer& x, const ffi::AnyBuffer& w, const ffi::AnyBuffer& y,
                      int64_t stride_h, int64_t stride_w, int64_t pad_h_lo, int64_t pad_h_hi,
                      int64_t pad_w_lo, int64_t pad_w_hi) {
  return MakeGeometry(x.dimensions().begin(), w.dimensions().begin(), y.dimensions().begin(),
                      x.element_type() == ffi::DataType::BF16, stride_h, stride_w, pad_h_lo,
                      pad_h_hi, pad_w_lo, pad_w_hi);
}

// The Python side (resnet_jax.onednn) calls these with three tensors of one supported type.
ffi::Error CheckTypes(const ffi::AnyBuffer& a, const ffi::AnyBuffer& b, const ffi::AnyBuffer& c) {
  ffi::DataType type = a.element_type();
  if ((type != ffi::DataType::F32 && type != ffi::DataType::BF16) ||
      b.element_type() != type || c.element_type() != type)
    return ffi::Error::InvalidArgument("oneDNN conv: operands must all be float32 or bfloat16");
  return ffi::Error::Success();
}

dnnl::primitive_attr UserScratchpad() {
  dnnl::primitive_attr attr;
  attr.set_scratchpad_mode(dnnl::scratchpad_mode::user);
  return attr;
}

dnnl::convolution_forward::primitive_desc ForwardDesc(const Geometry& g) {
  return {Engine(),  dnnl::prop_kind::forward_training, dnnl::algorithm::convolution_direct,
          g.Src(),   g.AnyWeights(), g.Dst(), g.strides, g.pad_low, g.pad_high,
          UserScratchpad()};
}

// The scratchpad a primitive asks for, in this thread's buffer (grown as needed, then reused),
// page-aligned as oneDNN aligns its own.
memory Scratchpad(const memory::desc& desc) {
  constexpr size_t kAlign = 4096;
  thread_local std::vector<char> buffer;
  size_t size = desc.get_size(), space = size + kAlign;
  if (buffer.size() < space) buffer.resize(space);
  void* start = buffer.data();
  return memory(desc, Engine(), std::align(kAlign, size, start, space));
}

// A primitive and its descriptor for one shape, built on first use and kept.
template <typename Primitive, typename Build>
std::shared_ptr<Primitive> Cached(const std::string& key, Build build) {
  static std::mutex mutex;
  static std::unordered_map<std::string, std::shared_ptr<void>> cache;
  std::lock_guard<std::mutex> lock(mutex);
  std::shared_ptr<void>& slot = cache[key];
  if (!slot) slot = std::make_shared<Primitive>(build());
  return std::static_pointer_cast<Primitive>(slot);
}

// The user's HWIO kernel in the layout the primitive wants (a reorder when they differ).
memory KernelAs(const memory::desc& wanted, const Geometry& g, void* data, dnnl::stream& stream) {
  memory user(g.UserWeights(), Engine(), data);
  if (wanted == user.get_desc()) return user;
  memory reordered(wanted, Engine());
  dnnl::reorder(user, reordered).execute(stream, user, reordered);
  return reordered;
}

// The descriptor of a backward primitive (data or weights), hinted by the forward one.
template <typename Primitive>
typename Primitive::primitive_desc BackwardDesc(const Geometry& g) {
  return {Engine(),  dnnl::algorithm::convolution_direct,
          g.Src(),   g.AnyWeights(),
          g.Dst(),   g.strides,
          g.pad_low, g.pad_high,
          ForwardDesc(g), UserScratchpad()};
}

// A backward primitive (data or weights) for one shape, cached.
template <typename Primitive>
auto CachedBackward(const Geometry& g, char kind) {
  using Desc = typename Primitive::primitive_desc;
  return Cached<std::pair<Desc, Primitive>>(g.Key(kind), [&] {
    Desc desc = BackwardDesc<Primitive>(g);
    return std::make_pair(desc, Primitive(desc));
  });
}

ffi::Error Forward(ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> y,
                   int64_t stride_h, int64_t stride_w, int64_t pad_h_lo, int64_t pad_h_hi,
                   int64_t pad_w_lo, int64_t pad_w_hi) {
  if (ffi::Error error = CheckTypes(x, w, *y); error.failure()) return error;
  FixedThreads threads;
  Geometry g = MakeGeometry(x, w, *y, stride_h, stride_w, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi);
  using Desc = dnnl::convolution_forward::primitive_desc;
  auto cached = Cached<std::pair<Desc, dnnl::convolution_forward>>(g.Key('f'), [&] {
    Desc desc = ForwardDesc(g);
    return std::make_pair(desc, dnnl::convolution_forward(desc));
  });
  dnnl::stream stream(Engine());
  memory src(g.Src(), Engine(), x.untyped_data()), dst(g.Dst(), Engine(), y->untyped_data());
  memory kernel = KernelAs(cached->first.weights_desc(), g, w.untyped_data(), stream);
  cached->second.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_WEIGHTS, kernel}, {DNNL_ARG_DST, dst},
                                  {DNNL_ARG_SCRATCHPAD, Scratchpad(cached->first.scratchpad_desc())}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error BackwardData(ffi::AnyBuffer dy, ffi::AnyBuffer w, ffi::Result<ffi::AnyBuffer> dx,
                        int64_t stride_h, int64_t stride_w, int64_t pad_h_lo, int64_t pad_h_hi,
                        int64_t pad_w_lo, int64_t pad_w_hi) {
  if (ffi::Error error = CheckTypes(dy, w, *dx); error.failure()) return error;
  FixedThreads threads;
  Geometry g = MakeGeometry(*dx, w, dy, stride_h, stride_w, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi);
  auto cached = CachedBackward<dnnl::convolution_backward_data>(g, 'd');
  dnnl::stream stream(Engine());
  memory diff_dst(g.Dst(), Engine(), dy.untyped_data());
  memory diff_src(g.Src(), Engine(), dx->untyped_data());
  memory kernel = KernelAs(cached->first.weights_desc(), g, w.untyped_data(), stream);
  cached->second.execute(stream, {{DNNL_ARG_DIFF_DST, diff_dst}, {DNNL_ARG_WEIGHTS, kernel},
                                  {DNNL_ARG_DIFF_SRC, diff_src},
                                  {DNNL_ARG_SCRATCHPAD, Scratchpad(cached->first.scratchpad_desc())}});
  stream.wait();
  return ffi::Error::Success();
}

ffi::Error BackwardWeights(ffi::AnyBuffer x, ffi::AnyBuffer dy, ffi::Result<ffi::AnyBuffer> dw,
                           int64_t stride_h, int64_t stride_w, int64_t pad_h_lo, int64_t pad_h_hi,
                           int64_t pad_w_lo, int64_t pad_w_hi) {
  if (ffi::Error error = CheckTypes(x, dy, *dw); error.failure()) return error;
  FixedThreads threads;
  Geometry g = MakeGeometry(x, *dw, dy, stride_h, stride_w, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi);
  auto cached = CachedBackward<dnnl::convolution_backward_weights>(g, 'w');
  dnnl::stream stream(Engine());
  memory src(g.Src(), Engine(), x.untyped_data()), diff_dst(g.Dst(), Engine(), dy.untyped_data());
  memory user(g.UserWeights(), Engine(), dw->untyped_data());
  const memory::desc& wanted = cached->first.diff_weights_desc();
  memory diff_weights = wanted == user.get_desc() ? user : memory(wanted, Engine());
  cached->second.execute(stream, {{DNNL_ARG_SRC, src}, {DNNL_ARG_DIFF_DST, diff_dst},
                                  {DNNL_ARG_DIFF_WEIGHTS, diff_weights},
                                  {DNNL_ARG_SCRATCHPAD, Scratchpad(cached->first.scratchpad_desc())}});
  if (diff_weights != user) dnnl::reorder(diff_weights, user).execute(stream, diff_weights, user);
  stream.wait();
  return ffi::Error::Success();
}

// bfloat16 is the high half of a float32.
float Widen(float value) { return value; }
float Widen(uint16_t value) { return __builtin_bit_cast(float, uint32_t{value} << 16); }

// Adds sum(a) and sum(a * b) over `rows` rows of `channels` values into the two sums.
template <typename T>
[[gnu::always_inline]] inline void AddRows(const T* a, const T* b, int64_t rows, int64_t channels,
                                           float* sum_a, float* sum_ab) {
  for (int64_t r = 0; r < rows; ++r, a += channels, b += channels) {
#pragma omp simd
    for (int64_t c = 0; c < channels; ++c) {
      float x = Widen(a[c]);
      sum_a[c] += x;
      sum_ab[c] += x * Widen(b[c]);
    }
  }
}

// Vectorized for the CPU it runs on: the library is built without -march.
[[gnu::target_clones("avx512f", "avx2", "default")]] void AddRowsF32(
    const float* a, const float* b, int64_t rows, int64_t channels, float* sum_a, float* sum_ab) {
  AddRows(a, b, rows, channels, sum_a, sum_ab);
}
[[gnu::target_clones("avx512f", "avx2", "default")]] void AddRowsBF16(
    const uint16_t* a, const uint16_t* b, int64_t rows, int64_t channels, float* sum_a,
    float* sum_ab) {
  AddRows(a, b, rows, channels, sum_a, sum_ab);
}

// Per-channel sum(a) and sum(a * b) of two alike [..., C] tensors, as float32. Each thread takes
// a contiguous share of the rows; blocks of rows sum in float32, the blocks add up in double, so
// the result does not depend on the tensor's size and is the same from run to run.
ffi::Error ChannelSums(ffi::AnyBuffer a, ffi::AnyBuffer b, ffi::Result<ffi::Buffer<ffi::F32>> sum_a,
                       ffi::Result<ffi::Buffer<ffi::F32>> sum_ab) {
  ffi::DataType type = a.element_type();
  const int64_t channels = sum_a->element_count();
  if ((type != ffi::DataType::F32 && type != ffi::DataType::BF16) || b.element_type() != type ||
      a.element_count() != b.element_count() || a.element_count() % channels != 0)
    return ffi::Error::InvalidArgument(
        "channel sums: operands must be alike float32 or bfloat16 tensors of [..., channels]");
  constexpr int64_t kBlockRows = 128;
  const int64_t rows = a.element_count() / channels;
  const int threads = Threads();
  std::vector<double> totals(2 * channels * threads, 0.0);
#pragma omp parallel num_threads(threads)
  {
    const int thread = omp_get_thread_num(), team = omp_get_num_threads();
    std::vector<float> block(2 * channels);
    double* total = totals.data() + 2 * channels * thread;
    for (int64_t r = rows * thread / team, end = rows * (thread + 1) / team; r < end;
         r += kBlockRows) {
      std::fill(block.begin(), block.end(), 0.0f);
      const int64_t count = std::min(kBlockRows, end - r), offset = r * channels;
      if (type == ffi::DataType::F32)
        AddRowsF32(static_cast<const float*>(a.untyped_data()) + offset,
                   static_cast<const float*>(b.untyped_data()) + offset, count, channels,
                   block.data(), block.data() + channels);
      else
        AddRowsBF16(static_cast<const uint16_t*>(a.untyped_data()) + offset,
                    static_cast<const uint16_t*>(b.untyped_data()) + offset, count, channels,
                    block.data(), block.data() + channels);
      for (int64_t c = 0; c < 2 * channels; ++c) total[c] += block[c];
    }
  }
  for (int64_t c = 0; c < channels; ++c) {
    double first = 0.0, second = 0.0;
    for (int thread = 0; thread < threads; ++thread) {
      first += totals[2 * channels * thread + c];
      second += totals[2 * channels * thread + channels + c];
    }
    sum_a->typed_data()[c] = static_cast<float>(first);
    sum_ab->typed_data()[c] = static_cast<float>(second);
  }
  return ffi::Error::Success();
}

// The implementation oneDNN picks for a primitive descriptor ("jit:avx2", "ref:any", ...), or ""
// when it cannot build one on this CPU (oneDNN throws).
template <typename Build>
std::string ImplementationOf(Build build) {
  try {
    return build().impl_info_str();
  } catch (const dnnl::error&) {
    return "";
  }
}

}  // namespace

// For Python (ctypes), once per conv shape: the implementations of the conv's forward, input
// gradient and kernel gradient primitives on this CPU, written to `names` as "fwd;data;weights"
// (empty where oneDNN cannot build one). `dims`: NHWC x, HWIO w and NHWC y dims, then stride_h,
// stride_w, pad_h_lo, pad_h_hi, pad_w_lo, pad_w_hi. Returns the length written, or -1 when
// `capacity` is too small.
extern "C" int64_t ResnetJaxConvImplementations(int bf16, const int64_t* dims, char* names,
                                                int64_t capacity) {
  Geometry g = MakeGeometry(dims, dims + 4, dims + 8, bf16 != 0, dims[12], dims[13], dims[14],
                            dims[15], dims[16], dims[17]);
  std::string joined =
      ImplementationOf([&] { return ForwardDesc(g); }) + ";" +
      ImplementationOf([&] { return BackwardDesc<dnnl::convolution_backward_data>(g); }) + ";" +
      ImplementationOf([&] { return BackwardDesc<dnnl::convolution_backward_weights>(g); });
  if (static_cast<int64_t>(joined.size()) + 1 > capacity) return -1;
  std::copy(joined.begin(), joined.end(), names);
  names[joined.size()] = '\0';
  return static_cast<int64_t>(joined.size());
}

namespace {

// Two NHWC/HWIO operands, one result, and the conv's strides and explicit padding.
auto Binding() {
  return ffi::Ffi::Bind()
      .Arg<ffi::AnyBuffer>()
      .Arg<ffi::AnyBuffer>()
      .Ret<ffi::AnyBuffer>()
      .Attr<int64_t>("stride_h")
      .Attr<int64_t>("stride_w")
      .Attr<int64_t>("pad_h_lo")
      .Attr<int64_t>("pad_h_hi")
      .Attr<int64_t>("pad_w_lo")
      .Attr<int64_t>("pad_w_hi");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvForward, Forward, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvBackwardData, BackwardData, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxConvBackwardWeights, BackwardWeights, Binding());
XLA_FFI_DEFINE_HANDLER_SYMBOL(ResnetJaxChannelSums, ChannelSums,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
