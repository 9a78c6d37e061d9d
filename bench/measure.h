#pragma once

// What both benchmarks measure with: process CPU time, minor page faults, medians.

#include <sys/resource.h>

#include <algorithm>
#include <cmath>
#include <ctime>
#include <vector>

namespace dptorch::bench {

// Process CPU time in ms: all threads of this process, so that time the machine gives to other
// processes does not count (with one thread, the cost of the work itself).
inline double cpu_ms() {
  timespec ts{};
  clock_gettime(CLOCK_PROCESS_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e3 + static_cast<double>(ts.tv_nsec) * 1e-6;
}

// Minor page faults of this process so far (first touches of fresh pages).
inline double page_faults() {
  struct rusage usage {};
  getrusage(RUSAGE_SELF, &usage);
  return static_cast<double>(usage.ru_minflt);
}

// The median (mean of the middle two for an even count); NaN for none.
inline double median(std::vector<double> v) {
  if (v.empty()) return NAN;
  std::sort(v.begin(), v.end());
  const size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

}  // namespace dptorch::bench
