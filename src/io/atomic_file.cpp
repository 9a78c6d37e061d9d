#include <dptorch/io/atomic_file.h>

#include "io/descriptor.h"

#include <c10/util/Exception.h>

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>

namespace dptorch::io {
namespace {

using detail::Descriptor;

[[noreturn]] void fail(const std::string& path, const std::string& tmp, const char* what,
                       int error) {
  ::unlink(tmp.c_str());
  TORCH_CHECK(false, "could not write ", path, ": ", what, " failed (", std::strerror(error),
              "); check that the directory exists, is writable and has space");
}

// The directory that holds `path` ("." for a bare file name).
std::string directory_of(const std::string& path) {
  const auto slash = path.find_last_of('/');
  if (slash == std::string::npos) return ".";
  if (slash == 0) return "/";
  return path.substr(0, slash);
}

}  // namespace

void write_file_atomically(const std::string& path, std::initializer_list<std::string_view> parts) {
  TORCH_CHECK_VALUE(!path.empty(), "write_file_atomically needs a path, got an empty one");
  const std::string tmp = path + ".tmp";
  Descriptor file(::open(tmp.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644));
  if (file.get() < 0) {
    const int error = errno;
    TORCH_CHECK(false, "could not write ", path, ": cannot create ", tmp, " (",
                std::strerror(error),
                "); check that the directory exists, is writable and has space");
  }
  for (const auto part : parts) {
    const char* data = part.data();
    size_t left = part.size();
    while (left > 0) {
      const ssize_t written = ::write(file.get(), data, left);
      if (written < 0) {
        if (errno == EINTR) continue;
        fail(path, tmp, "write", errno);
      }
      data += written;
      left -= static_cast<size_t>(written);
    }
  }
  if (::fsync(file.get()) != 0) fail(path, tmp, "fsync", errno);
  if (!file.close()) fail(path, tmp, "close", errno);
  if (std::rename(tmp.c_str(), path.c_str()) != 0) fail(path, tmp, "rename", errno);
  // The rename lives in the directory: flush it too. Some file systems refuse fsync on a
  // directory (EINVAL); the rename has happened then, and there is nothing more to do.
  Descriptor directory(::open(directory_of(path).c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
  if (directory.get() >= 0 && ::fsync(directory.get()) != 0 && errno != EINVAL) {
    const int error = errno;
    TORCH_CHECK(false, "wrote ", path, " but could not flush its directory (", std::strerror(error),
                ")");
  }
}

void write_file_atomically(const std::string& path, std::string_view bytes) {
  write_file_atomically(path, {bytes});
}

}  // namespace dptorch::io
