#include "child.h"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <fcntl.h>
#include <grp.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "landlock.h"
#include "seccomp_filter.h"

namespace sandbox {
namespace {

bool close_range_fds(unsigned first, unsigned last) {
  if (first > last) return true;
  if (syscall(SYS_close_range, first, last, 0U) == 0) return true;
  if (errno != ENOSYS) return false;
  struct rlimit open_files;
  if (getrlimit(RLIMIT_NOFILE, &open_files) != 0) return false;
  const unsigned end = std::min<rlim_t>(last, open_files.rlim_cur);
  for (unsigned fd = first; fd <= end; ++fd) close(static_cast<int>(fd));
  return true;
}

// Closes every fd from 4 up except `keep` (sorted), which the spec guarantees are all >= 4.
bool close_inherited_fds(std::vector<int> keep) {
  std::sort(keep.begin(), keep.end());
  unsigned next = 4;
  for (int fd : keep) {
    if (!close_range_fds(next, static_cast<unsigned>(fd) - 1)) return false;
    next = static_cast<unsigned>(fd) + 1;
  }
  return close_range_fds(next, ~0U);
}

bool drop_privileges(uid_t uid, gid_t gid) {
  return setgroups(0, nullptr) == 0 && setresgid(gid, gid, gid) == 0 && setresuid(uid, uid, uid) == 0;
}

}  // namespace

const char* isolate_child(const ChildSpec& spec) noexcept {
  // A session of its own, so no controlling terminal: /dev/tty cannot be opened (nor, with it, the
  // trainer's terminal). It also leads its own process group, which the supervisor kills as a whole.
  if (setsid() < 0) return "setsid";
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) return "PR_SET_PDEATHSIG";
  const int targets[] = {spec.stdin_fd, spec.stdout_fd, spec.stderr_fd, spec.result_fd};
  for (int target = 0; target < 4; ++target) {
    if (dup2(targets[target], target) != target) return "dup2";
  }
  if (!close_inherited_fds(spec.keep_fds)) return "close_range";
  if (chdir(spec.workdir.c_str()) != 0) return "chdir";
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return "PR_SET_NO_NEW_PRIVS";
  if (spec.landlock_ruleset >= 0) {
    if (const char* failed = landlock_restrict_self(spec.landlock_ruleset)) return failed;
    if (close(spec.landlock_ruleset) != 0) return "close(landlock ruleset)";
  }
  if (const char* failed = apply_limits(spec.limits)) return failed;
  if (spec.drop_privileges && !drop_privileges(spec.uid, spec.gid)) return "setresuid";
  if (spec.seccomp) {
    if (const char* failed = install_seccomp_filter(getpid())) return failed;
  }
  return nullptr;
}

}  // namespace sandbox
