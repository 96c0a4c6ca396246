// Landlock: what a test child may read and write. Built once per worker as a ruleset; each test child
// restricts itself with it before any untrusted code runs.
#pragma once

#include <string>
#include <vector>

namespace sandbox {

// The Landlock ABI version of the running kernel, or 0 where Landlock is absent or disabled.
int landlock_abi() noexcept;

struct LandlockRules {
  std::string test_dir;                     // read, write, create, delete beneath: the test's directory,
                                            // or the read-only mount above its per-test tmpfs (a rule on
                                            // a mount point itself is ignored by Landlock)
  std::vector<std::string> read;            // read beneath (directories) or read (files): Python, libraries
  std::vector<std::string> read_write;      // files read and written: /dev/null
  std::vector<std::string> list;            // directories whose entries may be listed, not read: the
                                            // site-packages folders, whose readable entries are in `read`
};

// Creates the ruleset: every filesystem access the running ABI knows is handled, so anything not
// granted above is refused (reading a dataset, a home directory, another process's /proc, executing,
// device ioctls). Paths that do not exist are skipped. Returns the ruleset fd (close-on-exec); throws
// std::system_error naming the step that failed.
int build_landlock_ruleset(const LandlockRules& rules);

// Restricts the calling process with `ruleset_fd`. Needs PR_SET_NO_NEW_PRIVS (or CAP_SYS_ADMIN).
// Returns nullptr or the name of the failing step (errno set).
const char* landlock_restrict_self(int ruleset_fd) noexcept;

}  // namespace sandbox
