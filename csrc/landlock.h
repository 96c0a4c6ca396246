// Landlock: the test child may create, change and delete files only inside its own directory.
#pragma once

namespace sandbox {

// The Landlock ABI version of the running kernel, or 0 where Landlock is absent or disabled.
int landlock_abi() noexcept;

// Restricts the calling process: write-type access is allowed beneath `dir_fd` (and to /dev/null)
// only; reading is left to the uid and mount layers. Needs PR_SET_NO_NEW_PRIVS (or CAP_SYS_ADMIN).
// Returns nullptr or the name of the failing step (errno set).
const char* restrict_writes_to(int dir_fd) noexcept;

}  // namespace sandbox
