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

// One case of gather_rows: `row_bytes` a row, each source at `src_off`
// bytes past a 16-byte boundary (every third row at +4 instead when
// `mixed`), the destination at `dst_off`.
struct GatherCase {
  size_t row_bytes, src_off, dst_off;
  bool mixed;
};

// Would catch: a gather that reads the table in the wrong order or from the
// wrong row (scrambled, with a row repeated), passes the wrong lane's address
// round the warp, drops rows past the first grid (the grid-stride loop:
// 600 rows > 32 blocks x 16 warps) or past a warp's first 32 rows (one
// block: 16 warps, 38 rows each at 600), takes the 16-byte path for a
// misaligned source, destination or length (or decides it once for every
// row), drops the tail of a row longer than one round of the warp (4144
// bytes) or past its last 16-byte piece (2047 bytes), cannot read pinned
// host rows (they must be read through their mapped addresses), reads the
// table from host memory the device cannot see, or writes past the last
// row. Run with the default grid (at most 32 blocks) and with
// Config::cuda_gather_blocks at 1.
class CudaGatherRows : public ::testing::TestWithParam<int> {};

TEST_P(CudaGatherRows, CopiesEveryRowFromHostAndDeviceInTableOrder) {
  FL_SKIP_WITHOUT_GPU();
  Config config;
  config.cuda_gather_blocks = GetParam();
  auto dev = make_cuda(config);
  Stream s = dev->current_stream();
  std::mt19937_64 rng(cuda_test_seed());
  constexpr size_t kPool = 40;      // source rows of each kind
  constexpr size_t kStride = 4352;  // bytes from one source row to the next (16-byte aligned)
  constexpr size_t kGuard = 64;     // poisoned bytes past the last row
  auto host_rows = dev->driver().allocate_host(kPool * kStride);
  Mirrored dev_rows(*dev, kPool * kStride);
  auto* h = static_cast<uint8_t*>(host_rows->host_ptr());
  for (size_t i = 0; i < kPool * kStride; ++i) {
    h[i] = static_cast<uint8_t>(rng());
    dev_rows.host<uint8_t>()[i] = static_cast<uint8_t>(rng());
  }
  dev_rows.upload(s);  // the mirror keeps what the device rows hold
  s.synchronize();
  const GatherCase cases[] = {
      {2048, 0, 0, false},  // the 16-byte path, one round of the warp
      {4144, 0, 0, false},  // the 16-byte path, three rounds, the last partial
      {16, 0, 0, false},    // one 16-byte piece: one lane works
      {2047, 0, 0, false},  // the byte path: the length
      {2048, 4, 0, false},  // the byte path: the source
      {2048, 0, 4, false},  // the byte path: the destination
      {2048, 0, 0, true},   // either path, row by row
  };
  for (const GatherCase& c : cases) {
    for (size_t rows : {size_t{1}, size_t{7}, size_t{300}, size_t{600}}) {
      for (bool table_on_device : {false, true}) {
        SCOPED_TRACE(::testing::Message()
                     << "row_bytes " << c.row_bytes << ", source offset " << c.src_off
                     << ", destination offset " << c.dst_off << (c.mixed ? ", mixed" : "")
                     << ", rows " << rows << ", table on the "
                     << (table_on_device ? "device" : "host (mapped)"));
        // Row i reads source pick[i]: below kPool a host row, else a device
        // row; scrambled, and the last row repeats the first.
        std::vector<size_t> pick(rows);
        for (auto& p : pick) p = static_cast<size_t>(rng() % (2 * kPool));
        if (rows > 1) pick.back() = pick.front();
        std::vector<const void*> addr(rows);
        std::vector<const uint8_t*> want(rows);
        for (size_t i = 0; i < rows; ++i) {
          const size_t off = c.mixed && i % 3 == 1 ? 4 : c.src_off;
          const size_t at = (pick[i] % kPool) * kStride + off;
          if (pick[i] < kPool) {
            addr[i] = static_cast<const uint8_t*>(host_rows->device_ptr()) + at;
            want[i] = h + at;
          } else {
            addr[i] = static_cast<const uint8_t*>(dev_rows.dev()) + at;
            want[i] = dev_rows.host<uint8_t>() + at;
          }
        }
        auto table_host = dev->driver().allocate_host(rows * sizeof(void*));
        std::memcpy(table_host->host_ptr(), addr.data(), rows * sizeof(void*));
        std::unique_ptr<backend::Buffer> table_dev;
        const void* table = table_host->device_ptr();
        if (table_on_device) {
          table_dev = dev->driver().allocate(rows * sizeof(void*));
          s.dispatch("copy_bytes", KernelArgs()
                                       .ptr(table_dev->device_ptr())
                                       .ptr(table_host->host_ptr())
                                       .size(rows * sizeof(void*)));
          table = table_dev->device_ptr();
        }
        const size_t bytes = c.dst_off + rows * c.row_bytes + kGuard;
        Mirrored dst(*dev, bytes);
        std::memset(dst.host(), 0xCD, bytes);
        dst.upload(s);
        s.synchronize();  // download() poisons the host copy the upload reads
        s.dispatch("gather_rows", KernelArgs()
                                      .ptr(static_cast<uint8_t*>(dst.dev()) + c.dst_off)
                                      .ptr(table)
                                      .i64(static_cast<int64_t>(c.row_bytes))
                                      .size(rows));
        dst.download(s);
        const uint8_t* out = dst.host<uint8_t>() + c.dst_off;
        size_t wrong_rows = 0;
        for (size_t i = 0; i < rows; ++i)
          if (std::memcmp(out + i * c.row_bytes, want[i], c.row_bytes) != 0) {
            if (wrong_rows++ == 0)
              ADD_FAILURE() << "row " << i << " (source " << pick[i] << ") differs";
          }
        EXPECT_EQ(wrong_rows, 0u);
        for (size_t i = 0; i < c.dst_off; ++i)
          ASSERT_EQ(dst.host<uint8_t>()[i], 0xCD) << "wrote before the first row";
        for (size_t i = 0; i < kGuard; ++i)
          ASSERT_EQ(out[rows * c.row_bytes + i], 0xCD) << "wrote past the last row";
      }
    }
  }
  EXPECT_EQ(dev->driver().device_error(), nullptr);
}

INSTANTIATE_TEST_SUITE_P(GatherBlocks, CudaGatherRows, ::testing::Values(32, 1),
                         [](const ::testing::TestParamInfo<int>& p) {
                           return "Blocks" + std::to_string(p.param);
                         });

// Would catch: a gather of 0 rows (or of rows of 0 bytes) that launches
// anyway and writes a row, or reads its table, or refuses null pointers
// that the other kernels accept for n = 0.
TEST(CudaKernels, GatherRowsOfNothingWritesNothing) {
  FL_SKIP_WITHOUT_GPU();
  auto dev = make_cuda();
  Stream s = dev->current_stream();
  auto src = dev->driver().allocate_host(2048);
  std::memset(src->host_ptr(), 0x11, 2048);
  auto table = dev->driver().allocate_host(sizeof(void*));
  const void* row = src->device_ptr();
  std::memcpy(table->host_ptr(), &row, sizeof row);
  Mirrored dst(*dev, 4096);
  std::memset(dst.host(), 0xCD, 4096);
  dst.upload(s);
  s.synchronize();  // download() poisons the host copy the upload reads
  s.dispatch("gather_rows", KernelArgs().ptr(dst.dev()).ptr(table->device_ptr()).i64(2048).size(0));
  s.dispatch("gather_rows", KernelArgs().ptr(nullptr).ptr(nullptr).i64(2048).size(0));
  s.dispatch("gather_rows", KernelArgs().ptr(dst.dev()).ptr(table->device_ptr()).i64(0).size(1));
  dst.download(s);  // throws if any of them failed its work
  for (size_t i = 0; i < 4096; ++i) ASSERT_EQ(dst.host<uint8_t>()[i], 0xCD) << "byte " << i;
  EXPECT_EQ(dev->driver().device_error(), nullptr);
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
  for (const char* k : {"fill_f32", "copy_bytes", "copy_pinned", "gather_rows", "add_f32",
                        "scale_f32", "checksum_u32", "sleep_us", "trap"})
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
