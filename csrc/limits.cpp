#include "limits.h"

#include <sys/resource.h>

namespace sandbox {
namespace {

bool set_limit(int resource, rlim_t soft, rlim_t hard) noexcept {
  const struct rlimit value = {soft, hard};
  return setrlimit(resource, &value) == 0;
}

}  // namespace

const char* apply_limits(const Limits& limits) noexcept {
  if (!set_limit(RLIMIT_CORE, 0, 0)) return "RLIMIT_CORE";
  if (!set_limit(RLIMIT_AS, limits.address_space_bytes, limits.address_space_bytes)) return "RLIMIT_AS";
  if (!set_limit(RLIMIT_CPU, limits.cpu_seconds, limits.cpu_seconds + 1)) return "RLIMIT_CPU";
  if (!set_limit(RLIMIT_FSIZE, limits.file_size_bytes, limits.file_size_bytes)) return "RLIMIT_FSIZE";
  if (!set_limit(RLIMIT_NOFILE, limits.open_files, limits.open_files)) return "RLIMIT_NOFILE";
  if (!set_limit(RLIMIT_NPROC, limits.processes, limits.processes)) return "RLIMIT_NPROC";
  return nullptr;
}

}  // namespace sandbox
