// Checkpoints: PrivacyEngine::load_checkpoint of a fuzzed file into a run whose optimiser has
// momentum and whose noise source has a state. Two kinds of input:
// - the file as it lies on disk (checked header, then torch's archive): the header, its size and
//   its CRC-32 are checked before torch's reader sees a byte;
// - 'S' and then choices: a checkpoint assembled from good and bad parts (format, fingerprint,
//   accountant and noise states, info tensor of any dtype and size, model state of another
//   shape or none, optimiser state of another optimiser or none, clipping threshold, job size),
//   archived by torch and given a valid checksum, so that dptorch's own checks behind the
//   checksum are what is fuzzed.
// A refused checkpoint must leave everything as it was (weights, momentum, noise state,
// accountant history, step count); an accepted one is undone by loading the good one again.
// With DPTORCH_FUZZ_SEEDS set to a directory, the target writes one seed of each kind there
// and exits (scripts/fuzz.sh does this before the run).
#include <dptorch/dptorch.h>

#include <fuzzer/FuzzedDataProvider.h>

#include <cstdlib>
#include <fstream>
#include <functional>
#include <memory>
#include <sstream>
#include <string>
#include <vector>

#include "fuzz_util.h"

namespace {

namespace tnn = torch::nn;
using dptorch::PrivacyEngine;
using dptorch::PrivateTraining;
using dptorch::data::TensorPairDataset;

tnn::Sequential make_model(int64_t hidden) {
  return tnn::Sequential(dptorch::nn::Linear(6, hidden), tnn::Tanh(),
                         dptorch::nn::Linear(hidden, 3), tnn::LogSoftmax(1));
}

// Everything a refused checkpoint must leave unchanged.
struct State {
  std::vector<torch::Tensor> tensors;
  std::string noise;
  std::vector<dptorch::accounting::HistoryEntry> history;
  int64_t steps = 0;
  bool operator==(const State& other) const {
    if (tensors.size() != other.tensors.size() || noise != other.noise ||
        history != other.history || steps != other.steps) {
      return false;
    }
    for (size_t i = 0; i < tensors.size(); ++i) {
      if (tensors[i].defined() != other.tensors[i].defined()) return false;
      if (tensors[i].defined() && !torch::equal(tensors[i], other.tensors[i])) return false;
    }
    return true;
  }
};

struct Fixture {
  tnn::Sequential model = make_model(8);
  PrivacyEngine engine;
  std::unique_ptr<PrivateTraining<TensorPairDataset>> run;
  std::string good_path = dptorch::fuzz::scratch_path(".good.pt");
  std::string good_file;  // the checked file's bytes
  // The good checkpoint's parts, for the assembled inputs.
  std::string fingerprint, accountant, noise;
  tnn::Sequential wider = make_model(9), empty;
  std::shared_ptr<torch::optim::Adam> adam;

  Fixture() {
    torch::manual_seed(5);
    auto x = torch::randn({200, 6});
    TensorPairDataset data(x, x.slice(1, 0, 3).argmax(1));
    run = std::make_unique<PrivateTraining<TensorPairDataset>>(
        engine.make_private(model,
                            std::make_shared<torch::optim::SGD>(
                                model->parameters(), torch::optim::SGDOptions(0.1).momentum(0.9)),
                            data,
                            dptorch::PrivacyOptions()
                                .noise_multiplier(1.0)
                                .expected_batch_size(20)
                                .clipping(dptorch::ClippingMode::kAdaptive)
                                .seed(2)));
    for (int s = 0; s < 2; ++s) {
      auto batch = run->loader.next();
      torch::nll_loss(model->forward(batch.data), batch.target).backward();
      run->optimizer->step();
    }
    engine.save_checkpoint(good_path, *run);
    std::ifstream in(good_path, std::ios::binary);
    good_file.assign(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
    (void)engine.load_checkpoint(good_path, *run);
    torch::serialize::InputArchive archive;
    std::istringstream payload(dptorch::io::read_checked_file(good_path, "checkpoint"));
    archive.load_from(payload);
    auto read_string = [&](const char* key) {
      c10::IValue value;
      archive.read(key, value);
      return value.toStringRef();
    };
    fingerprint = read_string("fingerprint");
    accountant = read_string("accountant");
    noise = read_string("noise");
    adam = std::make_shared<torch::optim::Adam>(model->parameters());
  }

  State state() const {
    State s;
    for (const auto& p : model->parameters()) s.tensors.push_back(p.detach().clone());
    auto& sgd = dynamic_cast<torch::optim::SGD&>(run->optimizer->inner());
    for (const auto& p : model->parameters()) {
      auto found = sgd.state().find(c10::guts::to_string(p.unsafeGetTensorImpl()));
      s.tensors.push_back(found == sgd.state().end()
                              ? torch::Tensor()
                              : static_cast<torch::optim::SGDParamState&>(*found->second)
                                    .momentum_buffer()
                                    .clone());
    }
    s.tensors.push_back(torch::tensor(std::dynamic_pointer_cast<dptorch::AdaptiveClipper>(
                                          run->optimizer->clipper().norm_clipper())
                                          ->max_norm()));
    s.noise = run->optimizer->noise().state();
    s.history = engine.accountant()->history();
    s.steps = run->optimizer->steps();
    return s;
  }

  // A checkpoint assembled from the choices in `input`: choice 0 of each is the good part.
  std::string assembled(FuzzedDataProvider& input) const {
    torch::serialize::OutputArchive archive;
    auto text = [&](const std::string& good) {
      switch (input.ConsumeIntegralInRange<int>(0, 2)) {
        case 0: return std::optional<std::string>(good);
        case 1: return std::optional<std::string>(input.ConsumeRandomLengthString(200));
        default: return std::optional<std::string>();
      }
    };
    auto write_text = [&](const char* key, const std::string& good) {
      if (auto value = text(good)) archive.write(key, c10::IValue(*value));
    };
    write_text("format", "dptorch-checkpoint-1");
    write_text("fingerprint", fingerprint);
    write_text("accountant", accountant);
    write_text("noise", noise);
    const auto dtypes = {torch::kLong, torch::kInt, torch::kFloat, torch::kDouble};
    const auto dtype = *(dtypes.begin() + input.ConsumeIntegralInRange<int>(0, 3));
    std::vector<int64_t> info{2, 2, 2};
    if (input.ConsumeBool()) {
      info.resize(input.ConsumeIntegralInRange<size_t>(0, 4));
      for (auto& v : info) v = input.ConsumeIntegral<int64_t>();
    }
    if (input.ConsumeIntegralInRange<int>(0, 3) != 3) {
      archive.write("info", torch::tensor(info, torch::kLong).to(dtype));
    }
    // `key` written by one of `savers`, or absent (the choice past the last).
    using Saver = std::function<void(torch::serialize::OutputArchive&)>;
    auto write_part = [&](const char* key, const std::vector<Saver>& savers) {
      const auto choice = input.ConsumeIntegralInRange<size_t>(0, savers.size());
      if (choice == savers.size()) return;
      torch::serialize::OutputArchive part;
      savers[choice](part);
      archive.write(key, part);
    };
    write_part("model",
               {[&](auto& part) { model->save(part); }, [&](auto& part) { wider->save(part); },
                [&](auto& part) { empty->save(part); }});
    write_part("optimizer", {[&](auto& part) { run->optimizer->inner().save(part); },
                             [&](auto& part) { adam->save(part); }, [](auto&) {}});
    switch (input.ConsumeIntegralInRange<int>(0, 3)) {
      case 0: archive.write("max_norm", c10::IValue(input.ConsumeFloatingPoint<double>())); break;
      case 1: archive.write("max_norm", c10::IValue(std::string("1.0"))); break;
      default: break;
    }
    if (input.ConsumeBool()) {
      archive.write("world_size", c10::IValue(input.ConsumeIntegral<int64_t>()));
    }
    std::ostringstream bytes;
    archive.save_to(bytes);
    return dptorch::io::checked_header("checkpoint", bytes.str()) + bytes.str();
  }
};

Fixture& fixture() {
  static Fixture* f = new Fixture();
  return *f;
}

void write_file(const std::string& path, const std::string& bytes) {
  std::ofstream(path, std::ios::binary | std::ios::trunc)
      .write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
}

}  // namespace

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  auto& f = fixture();
  if (const char* dir = std::getenv("DPTORCH_FUZZ_SEEDS")) {
    write_file(std::string(dir) + "/good-file", f.good_file);
    write_file(std::string(dir) + "/assembled-good", "S");
    std::exit(0);
  }
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  auto& f = fixture();
  std::string file;
  if (size > 0 && data[0] == 'S') {
    FuzzedDataProvider input(data + 1, size - 1);
    file = f.assembled(input);
  } else {
    file.assign(reinterpret_cast<const char*>(data), size);
  }
  const std::string path = dptorch::fuzz::scratch_path(".pt");
  write_file(path, file);
  const State before = f.state();
  try {
    (void)f.engine.load_checkpoint(path, *f.run);
  } catch (const c10::Error& e) {
    if (!(f.state() == before)) {
      fprintf(stderr, "a refused checkpoint changed the run: %s\n", e.what_without_backtrace());
      std::abort();
    }
    return 0;
  }
  (void)f.engine.load_checkpoint(f.good_path, *f.run);
  return 0;
}
