#pragma once

#include <torch/arg.h>
#include <torch/types.h>

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <mutex>
#include <optional>
#include <string>

namespace dptorch::optim {

/// Source of the Gaussian noise N(0, σ²C²) that DP-SGD adds to the clipped gradient sum
/// (docs/design.md §4); an interface so that tests can replace it.
class NoiseSource {
 public:
  virtual ~NoiseSource() = default;

  /// A tensor of `shape` whose entries are i.i.d. N(0, stddev²), on the device and of the
  /// floating dtype of `options` (the default dtype if it has none); stddev = 0 gives zeros.
  [[nodiscard]] virtual torch::Tensor gaussian(at::IntArrayRef shape, double stddev,
                                               const torch::TensorOptions& options) = 0;

  /// Adds i.i.d. N(0, stddev²) entries to `target` in place (its device and dtype). The default
  /// adds gaussian() of the target's shape; a source may override it to draw in cache-sized
  /// chunks, without a temporary the size of the target.
  virtual void add_gaussian_(const torch::Tensor& target, double stddev);

  /// Overwrites `target` with i.i.d. N(0, stddev²) entries (its device and dtype): the values
  /// gaussian() of the target's shape would return. The default copies gaussian(); a source may
  /// override it to write in place.
  virtual void fill_gaussian_(const torch::Tensor& target, double stddev);

  /// Whether the noise comes from a cryptographically secure generator, hardened against
  /// floating-point attacks: what a deployed privacy guarantee needs.
  [[nodiscard]] virtual bool is_secure() const noexcept = 0;

  /// Whether state() and set_state() can save and resume this source (checkpoints); false by
  /// default (SecureNoise: its stream cannot be replayed).
  [[nodiscard]] virtual bool resumable() const noexcept { return false; }

  /// The source's position as a byte string for a checkpoint; an error if not resumable().
  [[nodiscard]] virtual std::string state() const;

  /// Continues exactly where the source that wrote `state` was; an error if the string is not
  /// from a source of this kind, and then this source is unchanged.
  virtual void set_state(const std::string& state);
};

/// Reproducible noise from torch's own generators (mt19937 on the CPU, Philox on CUDA), one per
/// device, each seeded with `seed`: the same seed and the same calls give the same noise. For
/// streams that must match torch's own; PhiloxNoise (the default) is faster on the CPU and
/// independent of the thread count. NOT secure (the stream is predictable from the seed).
/// Example:
///   dptorch::optim::TorchNoise noise(42);
///   torch::Tensor n = noise.gaussian({10, 5}, sigma * max_grad_norm, param.options());
class TorchNoise final : public NoiseSource {
 public:
  /// Noise determined by `seed`. On the CPU only its low 32 bits matter (torch's mt19937).
  explicit TorchNoise(uint64_t seed);

  /// N(0, stddev²) entries drawn with the generator of the result's device.
  [[nodiscard]] torch::Tensor gaussian(at::IntArrayRef shape, double stddev,
                                       const torch::TensorOptions& options) override;

  /// On the CPU, draws into a reused buffer of kChunk entries and adds chunk by chunk (the same
  /// distribution as gaussian(), a different order of the stream); elsewhere the default.
  void add_gaussian_(const torch::Tensor& target, double stddev) override;

  /// Entries per chunk of add_gaussian_() on the CPU.
  static constexpr int64_t kChunk = int64_t{1} << 15;

  /// false: the stream is predictable from the seed.
  [[nodiscard]] bool is_secure() const noexcept override { return false; }

  /// true.
  [[nodiscard]] bool resumable() const noexcept override { return true; }

  /// The seed the generators started from.
  [[nodiscard]] uint64_t seed() const noexcept { return seed_; }

  /// The seed and every device generator's state as a byte string, for a checkpoint;
  /// set_state() of it makes this source continue exactly where it was.
  [[nodiscard]] std::string state() const override;

  /// Restores a state from state(), replacing the seed and all generator states.
  void set_state(const std::string& state) override;

 private:
  at::Generator& generator_for(const torch::Device& device);

  uint64_t seed_;
  mutable std::mutex mutex_;
  std::map<std::string, at::Generator> generators_;  // keyed by Device::str()
  torch::Tensor scratch_;                            // add_gaussian_()'s chunk on the CPU
};

/// Reproducible noise from a counter-based generator, the default non-secure source: entry j
/// of the k-th draw (gaussian() or add_gaussian_() call) is a function of (seed, k, j) alone —
/// Philox4x32-10 (Salmon et al. 2011) keyed by the seed, at counter (j / 4, k), turned into
/// Gaussians by Box–Muller — so draws are computed in parallel blocks, the same for any number
/// of threads, and state() is two numbers. Float noise comes from a vectorised kernel
/// (src/optim/philox.h: |z| up to about 6.66), double noise from 53-bit uniforms and
/// the C library's log, sin and cos; other floating dtypes are drawn in float and converted, and
/// other devices get the CPU's values copied over, so a seed gives the same noise everywhere.
/// NOT secure (the stream is predictable from the seed).
/// Example:
///   dptorch::optim::PhiloxNoise noise(42);
///   noise.add_gaussian_(param.mutable_grad(), sigma * max_grad_norm);
class PhiloxNoise final : public NoiseSource {
 public:
  /// Noise determined by `seed` (all 64 bits are the Philox key).
  explicit PhiloxNoise(uint64_t seed) : seed_(seed) {}

  /// N(0, stddev²) entries: the next draw of the stream.
  [[nodiscard]] torch::Tensor gaussian(at::IntArrayRef shape, double stddev,
                                       const torch::TensorOptions& options) override;

  /// Adds the next draw in place, without a temporary on the CPU for float and double: the
  /// result equals target + gaussian(target.sizes(), stddev, target.options()) from the same
  /// state, bit for bit on the CPU.
  void add_gaussian_(const torch::Tensor& target, double stddev) override;

  /// Writes the next draw in place, without a temporary on the CPU for float and double: the
  /// result equals gaussian(target.sizes(), stddev, target.options()) from the same state.
  void fill_gaussian_(const torch::Tensor& target, double stddev) override;

  /// false: the stream is predictable from the seed.
  [[nodiscard]] bool is_secure() const noexcept override { return false; }

  /// true.
  [[nodiscard]] bool resumable() const noexcept override { return true; }

  /// The seed (the Philox key).
  [[nodiscard]] uint64_t seed() const noexcept { return seed_; }

  /// Draws made so far: the next draw uses stream number draws().
  [[nodiscard]] uint64_t draws() const;

  /// The seed and the number of draws, as a byte string for a checkpoint.
  [[nodiscard]] std::string state() const override;

  /// Continues from a string of state(); an error (this source unchanged) for anything else.
  void set_state(const std::string& state) override;

 private:
  // Writes (or, with `add`, adds) stddev × draw `stream` into the contiguous CPU float or double
  // tensor `out`, in parallel blocks.
  void fill(const torch::Tensor& out, double stddev, uint64_t stream, bool add) const;
  // Draws into `target` (adds with `add`): in place where fill() can, else through gaussian().
  void draw_into(const torch::Tensor& target, double stddev, bool add);
  uint64_t next_stream();

  uint64_t seed_;
  uint64_t draws_ = 0;
  mutable std::mutex mutex_;
};

/// Cryptographically secure noise: random bits from the operating system (getrandom(2), else
/// /dev/urandom), turned into standard Gaussians in double precision by Box–Muller and then
/// converted to the requested dtype and device. Takes no seed.
///
/// Floating-point defence: a naively sampled Gaussian added in floating point leaks the input
/// through which values are representable (Mironov 2012, "On Significance of the Least
/// Significant Bits for Differential Privacy", for the Laplace case; Jin et al. 2022,
/// arXiv:2112.05307, for Gaussians). As in Opacus's secure mode (opacus/optimizers/optimizer.py,
/// _generate_noise), following Holohan & Braghin 2021 (arXiv:2107.10138), each output is the sum
/// of kNumDraws = 4 independent standard Gaussians divided by 2 = sqrt(4), still exactly
/// N(0, 1), before scaling by stddev.
class SecureNoise final : public NoiseSource {
 public:
  /// Independent standard Gaussians summed per output.
  static constexpr int kNumDraws = 4;

  /// A source drawing from the operating system's CSPRNG.
  SecureNoise() = default;

  /// N(0, stddev²) entries, generated on the CPU and moved to the result's device.
  [[nodiscard]] torch::Tensor gaussian(at::IntArrayRef shape, double stddev,
                                       const torch::TensorOptions& options) override;

  /// true.
  [[nodiscard]] bool is_secure() const noexcept override { return true; }
};

/// Fills `buffer` with `size` bytes from the operating system's CSPRNG (getrandom(2), else
/// /dev/urandom); an error if neither is available.
void secure_random_bytes(void* buffer, size_t size);

/// 64 bits from the operating system's CSPRNG, e.g. to seed a PoissonSampler whose batches must
/// stay secret.
[[nodiscard]] uint64_t secure_seed();

/// Which noise source make_noise_source() builds.
/// Example: `dptorch::optim::NoiseOptions().secure_mode(true)`.
struct NoiseOptions {
  /// Cryptographically secure noise (SecureNoise), which takes no seed.
  TORCH_ARG(bool, secure_mode) = false;
  /// Seed of the reproducible PhiloxNoise; without one, it is drawn from the OS. Refused in
  /// secure mode.
  TORCH_ARG(std::optional<uint64_t>, seed) = std::nullopt;
};

/// SecureNoise in secure mode, else PhiloxNoise(seed); a seed given with secure mode is an error.
[[nodiscard]] std::unique_ptr<NoiseSource> make_noise_source(const NoiseOptions& options = {});

}  // namespace dptorch::optim
