// Everything a forked test child does to itself before untrusted code runs: the core that composes
// the layers (limits.h, landlock.h, seccomp_filter.h; the namespaces are the worker's).
#pragma once

#include <string>
#include <sys/types.h>
#include <vector>

#include "limits.h"

namespace sandbox {

struct ChildSpec {
  Limits limits;
  std::string workdir;           // fresh, empty, owned by `uid`; becomes the cwd
  int stdin_fd = -1;             // become fds 0, 1, 2, 3 in the child (all must be >= 4 in the parent)
  int stdout_fd = -1;
  int stderr_fd = -1;
  int result_fd = -1;
  std::vector<int> keep_fds;     // also kept, at the same numbers (read-only directory handles)
  bool drop_privileges = false;  // switch to uid/gid (the worker is root)
  uid_t uid = 0;
  gid_t gid = 0;
  int landlock_ruleset = -1;     // the worker's Landlock ruleset (kept open, >= 4), or -1 for none
  bool seccomp = false;
};

// Applies the spec to the calling (freshly forked) process in a fixed order: own session and group,
// parent-death signal, fds, cwd, Landlock (then its ruleset fd is closed), rlimits, uid/gid, seccomp last. Returns nullptr, or the name
// of the step that failed (errno set); the caller must then exit without running the program.
const char* isolate_child(const ChildSpec& spec) noexcept;

}  // namespace sandbox
