#include "namespaces.h"

#include <cerrno>
#include <csignal>
#include <cstring>
#include <fcntl.h>
#include <sched.h>
#include <string>
#include <sys/mount.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "unique_fd.h"

namespace sandbox {
namespace {

constexpr unsigned kMountAttrRdonly = 0x00000001;  // linux/mount.h MOUNT_ATTR_RDONLY
constexpr unsigned kAtRecursive = 0x8000;          // AT_RECURSIVE

struct MountAttr {
  uint64_t attr_set, attr_clr, propagation, userns_fd;
};

bool write_file(const char* path, const std::string& text) {
  UniqueFd fd(open(path, O_WRONLY | O_CLOEXEC));
  if (!fd) return false;
  return write(fd.get(), text.data(), text.size()) == static_cast<ssize_t>(text.size());
}

// Maps the caller's own uid and gid into the new user namespace (the only mapping an unprivileged
// process may write), so files keep their owners and nothing gains real privilege.
bool map_identity(uid_t uid, gid_t gid) {
  const std::string uid_line = std::to_string(uid) + " " + std::to_string(uid) + " 1\n";
  const std::string gid_line = std::to_string(gid) + " " + std::to_string(gid) + " 1\n";
  return write_file("/proc/self/setgroups", "deny") && write_file("/proc/self/uid_map", uid_line) &&
         write_file("/proc/self/gid_map", gid_line);
}

bool remount_root_readonly() {
#ifdef SYS_mount_setattr
  const MountAttr attr = {kMountAttrRdonly, 0, 0, 0};
  return syscall(SYS_mount_setattr, AT_FDCWD, "/", kAtRecursive, &attr, sizeof(attr)) == 0;
#else
  return false;
#endif
}

// PID 1 of the workers' PID namespace: holds the namespace open and reaps orphans. Never returns.
[[noreturn]] void run_reaper() {
  prctl(PR_SET_PDEATHSIG, SIGKILL);
  prctl(PR_SET_NAME, "stepcoder-init");
  syscall(SYS_close_range, 0U, ~0U, 0U);
  sigset_t child_signal;
  sigemptyset(&child_signal);
  sigaddset(&child_signal, SIGCHLD);
  sigprocmask(SIG_BLOCK, &child_signal, nullptr);
  for (;;) {
    while (waitpid(-1, nullptr, WNOHANG) > 0) {
    }
    siginfo_t info;
    sigwaitinfo(&child_signal, &info);
  }
}

}  // namespace

NamespaceState enter_worker_namespaces(const std::string& work_root) {
  NamespaceState state;
  const uid_t uid = geteuid();
  const gid_t gid = getegid();
  const int base = CLONE_NEWNET | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS;
  // Root first tries without a user namespace (keeps the real uid change for the test children);
  // everyone else, and root without CAP_SYS_ADMIN, needs the user namespace in the same call.
  const int attempts[] = {uid == 0 ? base : base | CLONE_NEWUSER, base | CLONE_NEWUSER};
  int flags = 0;
  for (int attempt : attempts) {
    if (unshare(attempt) == 0) {
      flags = attempt;
      break;
    }
    state.refused = std::string("unshare: ") + std::strerror(errno);
  }
  if (flags == 0) return state;
  state.refused.clear();
  if ((flags & CLONE_NEWUSER) && !map_identity(uid, gid)) {
    // Without a mapping nothing in the namespace may act; the layers below would fail anyway.
    state.refused = std::string("writing the uid/gid map: ") + std::strerror(errno);
    return state;
  }
  state.user = flags & CLONE_NEWUSER;
  state.net = true;
  state.ipc = true;
  state.uts = true;
  if (mount(nullptr, "/", nullptr, MS_REC | MS_PRIVATE, nullptr) == 0) {
    state.readonly_root = remount_root_readonly();
    state.mount = mount("stepcoder", work_root.c_str(), "tmpfs", MS_NOSUID | MS_NODEV, "mode=0711,size=256m") == 0;
  }
  const pid_t reaper = fork();
  if (reaper == 0) run_reaper();
  if (reaper > 0) {
    state.pid = true;
    state.pid_init = reaper;
  }
  return state;
}

}  // namespace sandbox
