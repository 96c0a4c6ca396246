// The seccomp-bpf filter of a test child, built from the kernel headers (no libseccomp).
#pragma once

#include <sys/types.h>

namespace sandbox {

// Installs the filter on the calling process (PR_SET_NO_NEW_PRIVS first). `self` is the pid the child
// sees for itself (1 inside a fresh PID namespace): kill/tgkill/prlimit64 may target only it (or 0).
// Denied syscalls kill the whole process with SIGSYS, which the supervisor reports as a "violation";
// clone3 fails with ENOSYS so glibc falls back to clone, whose flags the filter can read (threads pass).
// Returns nullptr or the name of the failing step (errno set).
const char* install_seccomp_filter(pid_t self) noexcept;

// True when this kernel accepts seccomp filters at all (checked without installing one).
bool seccomp_available() noexcept;

}  // namespace sandbox
