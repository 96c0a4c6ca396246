#include "namespaces.h"

#include <Python.h>

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

// The process the pool started, once its child is PID 1 of the new namespace: it holds nothing open and
// only waits, so that the pool's kill or wait on it reaches the worker (which dies with it, and the
// whole namespace with the worker). Never returns.
[[noreturn]] void run_shim(pid_t worker) {
  prctl(PR_SET_NAME, "stepcoder-shim");
  syscall(SYS_close_range, 0U, ~0U, 0U);
  int status = 0;
  while (waitpid(worker, &status, 0) < 0) {
    if (errno != EINTR) _exit(1);
  }
  _exit(WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status));
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
  PyOS_BeforeFork();
  const pid_t worker = fork();
  if (worker > 0) run_shim(worker);
  if (worker < 0) {
    PyOS_AfterFork_Parent();
    state.refused = std::string("fork into the PID namespace: ") + std::strerror(errno);
    return state;
  }
  PyOS_AfterFork_Child();
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0) throw_errno("PR_SET_PDEATHSIG");
  state.pid = true;
  // The mounter's PID namespace decides what a procfs shows; hidepid hides processes of other uids too.
  state.fresh_proc = state.mount && mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC,
                                          "hidepid=2") == 0;
  return state;
}

void hide_directory(const std::string& path) {
  if (mount("stepcoder-hidden", path.c_str(), "tmpfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
            "size=4k,mode=0555") != 0) {
    throw_errno("mount(tmpfs, " + path + ")");
  }
}

}  // namespace sandbox
