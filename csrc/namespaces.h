// Namespaces for a worker, made once when it starts and inherited by every test child it forks.
#pragma once

#include <string>
#include <sys/types.h>

namespace sandbox {

struct NamespaceState {
  bool user = false;           // a new user namespace (needed when not root)
  bool net = false;            // no interfaces but a down loopback: no network even past seccomp
  bool mount = false;          // private mounts: "/" read-only, a private tmpfs for test directories
  bool readonly_root = false;  // the recursive read-only remount of "/" succeeded
  bool pid = false;            // test children live in a PID namespace whose init is `pid_init`
  bool ipc = false;
  bool uts = false;
  pid_t pid_init = -1;         // host pid of the namespace's reaper (PID 1 inside)
  std::string refused;         // why namespaces are off, when they are
};

// Moves the calling process (a single-threaded worker) into new namespaces, falling back from the
// full set to none when the kernel or container refuses. With a mount namespace, `work_root` gets a
// private tmpfs. With a PID namespace, forks a reaper that becomes PID 1 there, so every later child
// of the caller is inside it: kill(-1) reaches only the namespace, and orphans are reaped.
NamespaceState enter_worker_namespaces(const std::string& work_root);

}  // namespace sandbox
