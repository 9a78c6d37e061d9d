// Accountant states: load_accountant, and deserialize into an accountant with a history, which a
// refused state must leave as it was.
#include <dptorch/accounting/accountant.h>

#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string state(reinterpret_cast<const char*>(data), size);
  try {
    auto loaded = dptorch::accounting::load_accountant(state);
    if (loaded->total_steps() < 1000000) (void)loaded->epsilon(1e-5);
  } catch (const c10::Error&) {
  }
  auto accountant = dptorch::accounting::make_accountant("rdp");
  accountant->step(1.5, 0.01, 7);
  const auto before = accountant->history();
  try {
    accountant->deserialize(state);
  } catch (const c10::Error&) {
    if (accountant->history() != before) std::abort();  // a refused state changed the accountant
  }
  return 0;
}
