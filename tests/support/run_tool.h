#pragma once

#include <gtest/gtest.h>

#include <sys/wait.h>
#include <unistd.h>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#ifndef DPTORCH_TOOLS_DIR
#error "DPTORCH_TOOLS_DIR must name the folder that holds the command-line tools"
#endif

namespace dptorch::testing {

/// What a command-line tool printed and how it exited.
struct ToolRun {
  int status = -1;  ///< exit status, or -1 if the process did not exit normally
  std::string out;
  std::string err;
};

/// The path of tool `name` in the build tree.
inline std::string tool_path(const std::string& name) {
  return std::string(DPTORCH_TOOLS_DIR) + "/" + name;
}

/// Runs tool `name` with `args` (a shell-quoted string) and collects stdout, stderr and status.
inline ToolRun run_tool(const std::string& name, const std::string& args) {
  static int counter = 0;
  const std::string err_path = ::testing::TempDir() + name + "_stderr_" +
                               std::to_string(::getpid()) + "_" + std::to_string(counter++);
  const std::string command = "'" + tool_path(name) + "' " + args + " 2>'" + err_path + "'";
  ToolRun result;
  FILE* pipe = ::popen(command.c_str(), "r");
  if (pipe == nullptr) return result;
  char chunk[4096];
  size_t got = 0;
  while ((got = std::fread(chunk, 1, sizeof(chunk), pipe)) > 0) result.out.append(chunk, got);
  const int status = ::pclose(pipe);
  result.status = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  std::ifstream err_file(err_path);
  std::stringstream err;
  err << err_file.rdbuf();
  result.err = err.str();
  std::filesystem::remove(err_path);
  return result;
}

}  // namespace dptorch::testing
