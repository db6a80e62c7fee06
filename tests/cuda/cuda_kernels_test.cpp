// The CUDA kernels give the CPU kernels' answers; buffers, out-of-memory and
// devices behave as the driver contract says.
#include <chrono>
#include <random>
#include <set>

#include "cuda/cuda_test_util.h"

namespace flotilla::test {
namespace {

using backend::KernelArgs;

std::shared_ptr<Device> make_cuda(Config c = Config{}) { return Device::create("cuda", 0, c); }

TEST(CudaKernels, FillAddScaleChecksumGiveExactResults) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  std::mt19937_64 rng(cuda_test_seed());
  Stream s = dev->current_stream();
  // Sizes around the kernels' block and checksum-path boundaries.
  for (size_t n : {size_t{1}, size_t{255}, size_t{1000}, size_t{1} << 18, (size_t{1} << 18) + 1,
                   (size_t{1} << 21) + 3}) {
    SCOPED_TRACE(n);
    auto a = dev->driver().allocate(n * 4), b = dev->driver().allocate(n * 4);
    Mirrored c(*dev, n * 4), sum(*dev, 8);
    // Small integers: every float result below is exact.
    const auto v1 = static_cast<float>(rng() % 1000), v2 = static_cast<float>(rng() % 100 + 1);
    const float k = (rng() % 2) ? 2.0f : 3.0f;
    s.dispatch("fill_f32", KernelArgs().ptr(a->device_ptr()).f64(v1).size(n));
    s.dispatch("fill_f32", KernelArgs().ptr(b->device_ptr()).f64(v2).size(n));
    s.dispatch("add_f32",
               KernelArgs().ptr(a->device_ptr()).ptr(b->device_ptr()).ptr(c.dev()).size(n));
    s.dispatch("scale_f32", KernelArgs().ptr(c.dev()).ptr(c.dev()).f64(k).size(n));
    s.dispatch("checksum_u32", KernelArgs().ptr(c.dev()).ptr(sum.dev()).size(n));
    c.download(s);
    sum.download(s);
    const float want = (v1 + v2) * k;
    size_t wrong = 0;
    for (size_t i = 0; i < n; ++i) wrong += c.host()[i] != want;
    EXPECT_EQ(wrong, 0u) << "elements differ from " << want;
    EXPECT_EQ(*sum.host<uint64_t>(), uint64_t{float_bits(want)} * n);
  }
}

TEST(CudaKernels, ChecksumIsTheExactWrappingSumOfRandomWords) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  std::mt19937_64 rng(cuda_test_seed());
  Stream s = dev->current_stream();
  for (size_t n :
       {size_t{1}, size_t{1023}, size_t{1} << 18, (size_t{1} << 18) + 7, size_t{3} << 20}) {
    SCOPED_TRACE(n);
    Mirrored x(*dev, n * 4), sum(*dev, 8);
    uint64_t want = 0;
    for (size_t i = 0; i < n; ++i) {
      x.host<uint32_t>()[i] = static_cast<uint32_t>(rng());
      want += x.host<uint32_t>()[i];
    }
    x.upload(s);
    for (int rep = 0; rep < 3; ++rep) {  // deterministic: the same every time
      s.dispatch("checksum_u32", KernelArgs().ptr(x.dev()).ptr(sum.dev()).size(n));
      sum.download(s);
      EXPECT_EQ(*sum.host<uint64_t>(), want) << "repetition " << rep;
    }
  }
}

TEST(CudaKernels, CopyBytesWorksInEveryDirection) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  std::mt19937_64 rng(cuda_test_seed());
  Stream s = dev->current_stream();
  const size_t n = 100003;  // odd: not a multiple of any vector width
  Mirrored a(*dev, n), b(*dev, n);
  auto host_dst = dev->driver().allocate_host(n);
  std::vector<uint8_t> want(n);
  for (auto& v : want) v = static_cast<uint8_t>(rng());
  std::memcpy(a.host<uint8_t>(), want.data(), n);
  a.upload(s);                                                               // host -> device
  s.dispatch("copy_bytes", KernelArgs().ptr(b.dev()).ptr(a.dev()).size(n));  // device -> device
  b.download(s);                                                             // device -> host
  EXPECT_EQ(std::memcmp(b.host<uint8_t>(), want.data(), n), 0);
  s.dispatch("copy_bytes",  // host -> host (pinned)
             KernelArgs().ptr(host_dst->host_ptr()).ptr(b.host<uint8_t>()).size(n));
  s.synchronize();
  EXPECT_EQ(std::memcmp(host_dst->host_ptr(), want.data(), n), 0);
}

// Would catch: a kernel copy that drops a tail, mishandles unaligned sizes or
// addresses, or cannot reach pinned host memory (it must be mapped).
TEST(CudaKernels, CopyPinnedCopiesEveryDirectionAndAlignment) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  Stream s = dev->current_stream();
  std::mt19937 rng(11);
  for (size_t n : {size_t{1}, size_t{15}, size_t{16}, size_t{2048}, size_t{4099}, size_t{70000}}) {
    for (size_t off : {size_t{0}, size_t{3}}) {
      auto src = dev->driver().allocate_host(n + 16);
      auto mid = dev->driver().allocate(n + 16);
      auto dst = dev->driver().allocate_host(n + 16);
      auto* in = static_cast<uint8_t*>(src->host_ptr()) + off;
      for (size_t i = 0; i < n; ++i) in[i] = static_cast<uint8_t>(rng());
      std::memset(dst->host_ptr(), 0xAB, n + 16);
      auto* d = static_cast<uint8_t*>(mid->device_ptr());
      s.dispatch("copy_pinned", KernelArgs().ptr(d).ptr(in).size(n));      // host -> device
      s.dispatch("copy_pinned", KernelArgs().ptr(d + 16).ptr(d).size(n));  // device -> device
      auto* out = static_cast<uint8_t*>(dst->host_ptr()) + off;
      s.dispatch("copy_pinned", KernelArgs().ptr(out).ptr(d + 16).size(n));  // device -> host
      s.synchronize();
      EXPECT_EQ(std::memcmp(out, in, n), 0) << n << " bytes at offset " << off;
      EXPECT_EQ(out[n], 0xAB) << "wrote past the end";
    }
  }
}

TEST(CudaKernels, ZeroLengthKernelsDoNothing) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  Stream s = dev->current_stream();
  Mirrored a(*dev, 64);
  std::memset(a.host(), 0, 64);
  a.upload(s);
  s.dispatch("fill_f32", KernelArgs().ptr(a.dev()).f64(5.0).size(0));
  s.dispatch("copy_bytes", KernelArgs().ptr(a.dev()).ptr(a.dev()).size(0));
  s.dispatch("checksum_u32", KernelArgs().ptr(a.dev()).ptr(a.dev()).size(0));  // writes 0
  a.download(s);
  for (int i = 0; i < 16; ++i) EXPECT_EQ(a.host()[i], 0.0f);
}

TEST(CudaKernels, SleepLastsAtLeastItsTime) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  Stream s = dev->current_stream();
  s.synchronize();
  const auto t0 = std::chrono::steady_clock::now();
  s.dispatch("sleep_us", KernelArgs().i64(20000));
  s.synchronize();
  const auto ms =
      std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GE(ms, 19.5);
  EXPECT_LT(ms, 2000.0);
}

TEST(CudaKernels, BadArgumentsFailTheBufferNotTheDevice) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  Stream s = dev->current_stream();
  s.dispatch("fill_f32", KernelArgs().size(16));  // no pointer, no value
  try {
    s.synchronize();
    FAIL() << "a kernel with missing arguments did not fail its command buffer";
  } catch (const InvalidArgument& e) {
    EXPECT_NE(std::string(e.what()).find("fill_f32"), std::string::npos) << e.what();
  }
  // The device is fine: the next work runs.
  Mirrored a(*dev, 16 * 4);
  s.dispatch("fill_f32", KernelArgs().ptr(a.dev()).f64(4.0).size(16));
  a.download(s);
  EXPECT_EQ(a.host()[15], 4.0f);
  EXPECT_EQ(dev->driver().device_error(), nullptr);
}

TEST(CudaKernels, HasEveryBasicKernelOfTheCpuDriver) {
  FL_SKIP_WITHOUT_GPU();
  auto cuda = make_cuda();
  auto names = cuda->driver().pipeline_names();
  std::set<std::string> have(names.begin(), names.end());
  for (const char* k : {"fill_f32", "copy_bytes", "copy_pinned", "add_f32", "scale_f32",
                        "checksum_u32", "sleep_us", "trap"})
    EXPECT_TRUE(have.count(k)) << k;
  EXPECT_THROW(cuda->pipeline("no_such_kernel"), InvalidArgument);
}

TEST(CudaBuffers, DeviceMemoryIsNotHostVisiblePinnedMemoryIs) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  auto d = dev->driver().allocate(4096);
  auto h = dev->driver().allocate_host(4096);
  EXPECT_NE(d->device_ptr(), nullptr);
  EXPECT_EQ(d->host_ptr(), nullptr);
  EXPECT_NE(h->host_ptr(), nullptr);
  EXPECT_EQ(h->host_ptr(), h->device_ptr());  // unified addressing
  EXPECT_EQ(d->size(), 4096u);
  EXPECT_THROW(dev->driver().allocate(0), InvalidArgument);
}

TEST(CudaBuffers, OutOfMemorySaysWhatWasAskedAndWhatIsFree) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  const size_t huge = size_t{1} << 50;  // 1 PiB
  try {
    dev->driver().allocate(huge);
    FAIL() << "1 PiB was allocated";
  } catch (const OutOfMemory& e) {
    const std::string m = e.what();
    EXPECT_NE(m.find("asked for 1125899906842624 bytes"), std::string::npos) << m;
    EXPECT_NE(m.find("free of"), std::string::npos) << m;
    EXPECT_NE(m.find("[Driver::allocate]"), std::string::npos) << m;
  }
  // Not sticky: allocation and kernels still work.
  Mirrored a(*dev, 1 << 20);
  Stream s = dev->current_stream();
  s.dispatch("fill_f32", KernelArgs().ptr(a.dev()).f64(1.5).size((1 << 20) / 4));
  a.download(s);
  EXPECT_EQ(a.host()[1000], 1.5f);
  EXPECT_EQ(dev->driver().device_error(), nullptr);
}

TEST(CudaDevices, EveryDeviceRunsWorkAndTheNextIndexIsRefused) {
  FL_SKIP_WITHOUT_GPU();
  const int n = Device::count("cuda");
  for (int i = 0; i < n; ++i) {
    SCOPED_TRACE(i);
    auto dev = Device::create("cuda", i, Config{});
    EXPECT_EQ(dev->info().backend, "cuda");
    EXPECT_EQ(dev->info().index, i);
    EXPECT_GT(dev->info().memory_bytes, 0u);
    EXPECT_GT(dev->info().compute_units, 0);
    Stream s = dev->current_stream();
    Mirrored a(*dev, 1024 * 4), sum(*dev, 8);
    s.dispatch("fill_f32", KernelArgs().ptr(a.dev()).f64(static_cast<double>(i + 1)).size(1024));
    s.dispatch("checksum_u32", KernelArgs().ptr(a.dev()).ptr(sum.dev()).size(1024));
    sum.download(s);
    EXPECT_EQ(*sum.host<uint64_t>(), uint64_t{float_bits(static_cast<float>(i + 1))} * 1024);
  }
  EXPECT_THROW(Device::create("cuda", n, Config{}), InvalidArgument);
}

TEST(CudaDevices, DriverIsThreadSafeSoTheLockIsOffByDefault) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  EXPECT_TRUE(dev->driver().encoding_thread_safe());
  EXPECT_TRUE(dev->info().encoding_thread_safe);
  EXPECT_FALSE(dev->encoding_lock().enabled());
  EXPECT_NE(dev->info().name.find("CUDA_DEVICE_MAX_CONNECTIONS="), std::string::npos)
      << dev->info().name;
  std::printf("[ device   ] %s\n", dev->info().name.c_str());
}

}  // namespace
}  // namespace flotilla::test
