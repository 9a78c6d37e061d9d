// dpaccount's command line: the input, split at NUL bytes, is its arguments. Every call must
// return (0 for a good command line, 2 for a bad one, with a message), never crash or hang.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

int dpaccount_main(int argc, char** argv);

extern "C" int LLVMFuzzerInitialize(int*, char***) {
  // The tool's answers are not what is tested; keep them off the fuzzer's log.
  if (std::freopen("/dev/null", "w", stdout) == nullptr) return 1;
  return 0;
}

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  std::vector<std::string> args{"dpaccount"};
  std::string current;
  for (size_t i = 0; i < size && args.size() < 32; ++i) {
    if (data[i] == 0) {
      args.push_back(current);
      current.clear();
    } else {
      current.push_back(static_cast<char>(data[i]));
    }
  }
  args.push_back(current);
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const int status = dpaccount_main(static_cast<int>(args.size()), argv.data());
  if (status != 0 && status != 2) std::abort();  // neither an answer nor a clear refusal
  return 0;
}
