#pragma once

// A file descriptor that closes itself: shared by the io sources (internal, not installed).

#include <unistd.h>

namespace dptorch::io::detail {

/// Owns a descriptor from ::open and closes it when it goes out of scope (unless closed first).
class Descriptor {
 public:
  explicit Descriptor(int fd) : fd_(fd) {}
  Descriptor(const Descriptor&) = delete;
  Descriptor& operator=(const Descriptor&) = delete;
  ~Descriptor() {
    if (fd_ >= 0) ::close(fd_);
  }
  /// The descriptor; negative if ::open failed.
  [[nodiscard]] int get() const { return fd_; }
  /// Closes now and reports whether close succeeded (it can fail with a deferred write error).
  bool close() {
    const int fd = fd_;
    fd_ = -1;
    return ::close(fd) == 0;
  }

 private:
  int fd_;
};

}  // namespace dptorch::io::detail
