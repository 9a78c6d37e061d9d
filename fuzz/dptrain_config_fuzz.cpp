// dptrain's config.json, parsed and checked exactly as `dptrain --resume` does.
#include <c10/util/Exception.h>

#include "dptrain_config.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  try {
    const auto config = dptrain::from_json(nlohmann::json::parse(data, data + size));
    (void)dptrain::to_json(config).dump();
  } catch (const nlohmann::json::exception&) {
  } catch (const c10::Error&) {
  }
  return 0;
}
