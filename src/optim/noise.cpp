#include "dptorch/optim/noise.h"
#include <dptorch/common.h>

#include "optim/philox.h"

#include <ATen/Context.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <vector>

#if defined(__linux__)
#include <sys/random.h>
#endif

namespace dptorch::optim {
namespace {

constexpr char kStateMagic[] = "dptorch.TorchNoise.v1";
constexpr char kPhiloxMagic[] = "dptorch.PhiloxNoise.v1";
constexpr double kTwoPi = 6.283185307179586476925286766559;

void check_noise_arguments(double stddev, const torch::TensorOptions& options) {
  dptorch::detail::check_non_negative("stddev", stddev);
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  TORCH_CHECK_VALUE(at::isFloatingType(dtype), "noise dtype must be floating point, but is ", dtype,
                    "; pass the options of the parameter the noise is for");
}

void append_u64(std::string& out, uint64_t value) {
  for (int i = 0; i < 8; ++i) {
    out.push_back(static_cast<char>((value >> (8 * i)) & 0xFF));
  }
}

void append_bytes(std::string& out, const void* data, size_t size) {
  append_u64(out, size);
  out.append(static_cast<const char*>(data), size);
}

// Reads the fields of a TorchNoise state, with errors that say the state is damaged.
class StateReader {
 public:
  explicit StateReader(const std::string& state) : state_(state) {}

  uint64_t u64() {
    require(8);
    uint64_t value = 0;
    for (int i = 0; i < 8; ++i) {
      value |= uint64_t{static_cast<unsigned char>(state_[offset_ + i])} << (8 * i);
    }
    offset_ += 8;
    return value;
  }

  std::string bytes() {
    const uint64_t size = u64();
    require(size);
    std::string result = state_.substr(offset_, size);
    offset_ += size;
    return result;
  }

  [[nodiscard]] bool done() const { return offset_ == state_.size(); }

 private:
  void require(uint64_t size) const {
    TORCH_CHECK_VALUE(size <= state_.size() - offset_,
                      "TorchNoise state is truncated: it ends at byte ", state_.size(),
                      " but needs ", size, " more from byte ", offset_,
                      "; pass the unmodified string from TorchNoise::state()");
  }

  const std::string& state_;
  size_t offset_ = 0;
};

// Standard Gaussian pair by Box–Muller from two 64-bit words; u1 in (0, 1] so log(u1) is finite.
std::array<double, 2> box_muller(uint64_t a, uint64_t b) {
  const double u1 = static_cast<double>((a >> 11) + 1) * 0x1.0p-53;
  const double u2 = static_cast<double>(b >> 11) * 0x1.0p-53;
  const double radius = std::sqrt(-2.0 * std::log(u1));
  const double angle = kTwoPi * u2;
  return {radius * std::cos(angle), radius * std::sin(angle)};
}

}  // namespace

TorchNoise::TorchNoise(uint64_t seed) : seed_(seed) {}

at::Generator& TorchNoise::generator_for(const torch::Device& device) {
  const std::string key = device.str();
  auto found = generators_.find(key);
  if (found == generators_.end()) {
    // Cloning the device's default generator gives a private one of the right kind on any
    // backend (CPU, CUDA, ...), which is then reseeded.
    at::Generator default_generator = at::globalContext().defaultGenerator(device);
    at::Generator generator;
    {
      std::lock_guard<std::mutex> lock(default_generator.mutex());
      generator = default_generator.clone();
    }
    generator.set_current_seed(seed_);
    found = generators_.emplace(key, std::move(generator)).first;
  }
  return found->second;
}

torch::Tensor TorchNoise::gaussian(at::IntArrayRef shape, double stddev,
                                   const torch::TensorOptions& options) {
  check_noise_arguments(stddev, options);
  torch::Tensor result = torch::empty(shape, options.requires_grad(false));
  if (stddev == 0.0) {
    return result.zero_();
  }
  std::lock_guard<std::mutex> lock(mutex_);
  result.normal_(0.0, stddev, generator_for(result.device()));
  return result;
}

void NoiseSource::add_gaussian_(const torch::Tensor& target, double stddev) {
  check_noise_arguments(stddev, target.options());
  if (stddev == 0.0) return;
  target.add_(gaussian(target.sizes(), stddev, target.options()));
}

void NoiseSource::fill_gaussian_(const torch::Tensor& target, double stddev) {
  check_noise_arguments(stddev, target.options());
  target.copy_(gaussian(target.sizes(), stddev, target.options()));
}

void TorchNoise::add_gaussian_(const torch::Tensor& target, double stddev) {
  check_noise_arguments(stddev, target.options());
  if (stddev == 0.0) return;
  if (!target.device().is_cpu() || !target.is_contiguous()) {
    NoiseSource::add_gaussian_(target, stddev);
    return;
  }
  std::lock_guard<std::mutex> lock(mutex_);
  auto& generator = generator_for(target.device());
  if (!scratch_.defined() || scratch_.scalar_type() != target.scalar_type()) {
    scratch_ = torch::empty({kChunk}, target.options().requires_grad(false));
  }
  const auto flat = target.view({-1});
  const int64_t n = flat.numel();
  for (int64_t first = 0; first < n; first += kChunk) {
    const int64_t count = std::min(kChunk, n - first);
    auto chunk = scratch_.narrow(0, 0, count);
    chunk.normal_(0.0, stddev, generator);
    flat.narrow(0, first, count).add_(chunk);
  }
}

std::string TorchNoise::state() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out(kStateMagic);
  append_u64(out, seed_);
  append_u64(out, generators_.size());
  for (const auto& [device, generator] : generators_) {
    append_bytes(out, device.data(), device.size());
    const torch::Tensor bytes = generator.get_state().contiguous().to(torch::kCPU);
    append_bytes(out, bytes.data_ptr(), static_cast<size_t>(bytes.nbytes()));
  }
  return out;
}

void TorchNoise::set_state(const std::string& state) {
  const std::string magic(kStateMagic);
  TORCH_CHECK_VALUE(state.compare(0, magic.size(), magic) == 0,
                    "TorchNoise state does not start with '", magic,
                    "'; pass a string from TorchNoise::state()");
  const std::string rest = state.substr(magic.size());
  StateReader fields(rest);
  const uint64_t seed = fields.u64();
  const uint64_t count = fields.u64();
  std::map<std::string, at::Generator> generators;
  std::lock_guard<std::mutex> lock(mutex_);
  const uint64_t saved_seed = seed_;
  seed_ = seed;
  try {
    for (uint64_t i = 0; i < count; ++i) {
      const std::string device = fields.bytes();
      const std::string bytes = fields.bytes();
      at::Generator generator = at::globalContext().defaultGenerator(torch::Device(device)).clone();
      torch::Tensor tensor =
          torch::empty({static_cast<int64_t>(bytes.size())},
                       torch::TensorOptions().dtype(torch::kUInt8).device(torch::kCPU));
      std::memcpy(tensor.data_ptr(), bytes.data(), bytes.size());
      generator.set_state(tensor);
      generators.emplace(device, std::move(generator));
    }
    TORCH_CHECK_VALUE(fields.done(), "TorchNoise state has extra bytes after its ", count,
                      " generator states; pass the unmodified string from TorchNoise::state()");
  } catch (...) {
    seed_ = saved_seed;
    throw;
  }
  generators_ = std::move(generators);
}

torch::Tensor SecureNoise::gaussian(at::IntArrayRef shape, double stddev,
                                    const torch::TensorOptions& options) {
  check_noise_arguments(stddev, options);
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  if (stddev == 0.0) {
    return torch::zeros(shape, options.requires_grad(false));
  }
  torch::Tensor result =
      torch::empty(shape, torch::TensorOptions().dtype(torch::kFloat64).device(torch::kCPU));
  double* out = result.data_ptr<double>();
  constexpr int64_t kGrain = int64_t{1} << 14;
  constexpr int64_t kBlock = 4096;  // elements per request to the OS
  at::parallel_for(0, result.numel(), kGrain, [&](int64_t begin, int64_t end) {
    std::vector<uint64_t> words(static_cast<size_t>(kBlock * kNumDraws));
    for (int64_t first = begin; first < end; first += kBlock) {
      const int64_t count = std::min(kBlock, end - first);
      secure_random_bytes(words.data(), static_cast<size_t>(count * kNumDraws) * sizeof(uint64_t));
      for (int64_t i = 0; i < count; ++i) {
        const uint64_t* w = &words[static_cast<size_t>(i * kNumDraws)];
        const auto [z0, z1] = box_muller(w[0], w[1]);
        const auto [z2, z3] = box_muller(w[2], w[3]);
        // The sum of 4 standard Gaussians has variance 4: halving it restores N(0, 1).
        out[first + i] = stddev * ((z0 + z1) + (z2 + z3)) * 0.5;
      }
    }
  });
  return result.to(options.device(), dtype);
}

std::string NoiseSource::state() const {
  TORCH_CHECK_VALUE(false,
                    "this noise source cannot be saved (resumable() is false): secure noise ",
                    "cannot be replayed; checkpoints of secure-mode runs carry no noise state");
}

void NoiseSource::set_state(const std::string& /*state*/) {
  TORCH_CHECK_VALUE(false,
                    "this noise source cannot be restored (resumable() is false); resume "
                    "with the noise source the checkpoint was written with");
}

uint64_t PhiloxNoise::draws() const {
  std::lock_guard<std::mutex> lock(mutex_);
  return draws_;
}

uint64_t PhiloxNoise::next_stream() {
  std::lock_guard<std::mutex> lock(mutex_);
  return draws_++;
}

void PhiloxNoise::fill(const torch::Tensor& out, double stddev, uint64_t stream, bool add) const {
  // Blocks of 64k entries: each block's values depend on its position only, so the split
  // between threads changes nothing.
  constexpr int64_t kGrain = int64_t{1} << 16;
  const int64_t n = out.numel();
  if (out.scalar_type() == torch::kFloat) {
    float* data = out.data_ptr<float>();
    const auto scale = static_cast<float>(stddev);
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      detail::normal_fill(data + begin, end - begin, static_cast<uint64_t>(begin), seed_, stream,
                          scale, add);
    });
  } else {
    double* data = out.data_ptr<double>();
    at::parallel_for(0, n, kGrain, [&](int64_t begin, int64_t end) {
      detail::normal_fill(data + begin, end - begin, static_cast<uint64_t>(begin), seed_, stream,
                          stddev, add);
    });
  }
}

torch::Tensor PhiloxNoise::gaussian(at::IntArrayRef shape, double stddev,
                                    const torch::TensorOptions& options) {
  check_noise_arguments(stddev, options);
  const auto dtype = c10::typeMetaToScalarType(options.dtype());
  const uint64_t stream = next_stream();
  if (stddev == 0.0) return torch::zeros(shape, options.requires_grad(false));
  // Float and double are drawn as they are; other dtypes in float. On the CPU, then moved.
  const auto draw_dtype = dtype == torch::kDouble ? torch::kDouble : torch::kFloat;
  auto result = torch::empty(shape, torch::TensorOptions().dtype(draw_dtype));
  fill(result, stddev, stream, /*add=*/false);
  return result.to(options.device(), dtype);
}

void PhiloxNoise::add_gaussian_(const torch::Tensor& target, double stddev) {
  draw_into(target, stddev, /*add=*/true);
}

void PhiloxNoise::fill_gaussian_(const torch::Tensor& target, double stddev) {
  draw_into(target, stddev, /*add=*/false);
}

void PhiloxNoise::draw_into(const torch::Tensor& target, double stddev, bool add) {
  check_noise_arguments(stddev, target.options());
  const bool direct =
      target.device().is_cpu() && target.is_contiguous() &&
      (target.scalar_type() == torch::kFloat || target.scalar_type() == torch::kDouble);
  if (!direct) {
    auto draw = gaussian(target.sizes(), stddev, target.options());
    if (add) {
      target.add_(draw);
    } else {
      target.copy_(draw);
    }
    return;
  }
  const uint64_t stream = next_stream();
  if (stddev == 0.0) {
    if (!add) target.zero_();
    return;
  }
  fill(target, stddev, stream, add);
}

std::string PhiloxNoise::state() const {
  std::lock_guard<std::mutex> lock(mutex_);
  std::string out(kPhiloxMagic);
  append_u64(out, seed_);
  append_u64(out, draws_);
  return out;
}

void PhiloxNoise::set_state(const std::string& state) {
  const std::string magic(kPhiloxMagic);
  TORCH_CHECK_VALUE(state.compare(0, magic.size(), magic) == 0,
                    "PhiloxNoise state does not start with '", magic,
                    "'; pass a string from PhiloxNoise::state() (a checkpoint written with another "
                    "noise source must be resumed with that source)");
  const std::string rest = state.substr(magic.size());
  TORCH_CHECK_VALUE(rest.size() == 16, "PhiloxNoise state has ", rest.size(),
                    " bytes after its header instead of 16; pass the unmodified string from "
                    "PhiloxNoise::state()");
  StateReader fields(rest);
  const uint64_t seed = fields.u64();
  const uint64_t draws = fields.u64();
  std::lock_guard<std::mutex> lock(mutex_);
  seed_ = seed;
  draws_ = draws;
}

void secure_random_bytes(void* buffer, size_t size) {
  auto* out = static_cast<unsigned char*>(buffer);
#if defined(__linux__)
  size_t filled = 0;
  while (filled < size) {
    const ssize_t got = getrandom(out + filled, size - filled, 0);
    if (got < 0 && errno == EINTR) {
      continue;
    }
    if (got < 0 && errno == ENOSYS) {
      break;  // kernel older than 3.17: fall back to /dev/urandom
    }
    TORCH_CHECK(got >= 0, "getrandom(2) failed: ", std::strerror(errno));
    filled += static_cast<size_t>(got);
  }
  if (filled == size) {
    return;
  }
  out += filled;
  size -= filled;
#endif
  std::FILE* urandom = std::fopen("/dev/urandom", "rb");
  TORCH_CHECK(urandom != nullptr,
              "cannot open /dev/urandom for secure noise: ", std::strerror(errno));
  const size_t got = std::fread(out, 1, size, urandom);
  std::fclose(urandom);
  TORCH_CHECK(got == size, "reading /dev/urandom for secure noise returned ", got, " of ", size,
              " bytes");
}

uint64_t secure_seed() {
  uint64_t seed = 0;
  secure_random_bytes(&seed, sizeof(seed));
  return seed;
}

std::unique_ptr<NoiseSource> make_noise_source(const NoiseOptions& options) {
  if (options.secure_mode()) {
    TORCH_CHECK_VALUE(!options.seed().has_value(), "secure_mode takes no seed, but seed is ",
                      *options.seed(),
                      ": secure noise must be unpredictable; remove the seed, or turn secure_mode "
                      "off for reproducible (non-secure) noise");
    return std::make_unique<SecureNoise>();
  }
  return std::make_unique<PhiloxNoise>(options.seed() ? *options.seed() : secure_seed());
}

}  // namespace dptorch::optim
