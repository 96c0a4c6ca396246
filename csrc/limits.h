// Resource limits applied to a test child before untrusted code runs.
#pragma once

#include <cstdint>

namespace sandbox {

struct Limits {
  uint64_t address_space_bytes = 1ULL << 30;  // RLIMIT_AS: allocation fails (MemoryError) past it
  uint64_t cpu_seconds = 3;                    // RLIMIT_CPU soft; hard = soft + 1 (SIGXCPU, then SIGKILL)
  uint64_t file_size_bytes = 1ULL << 20;       // RLIMIT_FSIZE: also caps stdout/stderr, which are memfds
  uint64_t open_files = 64;                    // RLIMIT_NOFILE
  uint64_t processes = 64;                     // RLIMIT_NPROC: counts threads; only binds a non-root uid
};

// Applies every limit, core dumps off. Returns nullptr, or the name of the limit that failed (errno set).
const char* apply_limits(const Limits& limits) noexcept;

}  // namespace sandbox
