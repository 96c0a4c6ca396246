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
  bool pid = false;            // the worker is PID 1 of a new PID namespace; its test children are inside
  bool fresh_proc = false;     // /proc is that namespace's own: no other process of the host is visible
  bool ipc = false;
  bool uts = false;
  std::string refused;         // why namespaces are off, when they are
};

// Moves the calling process (a single-threaded worker) into new namespaces, falling back from the
// full set to none when the kernel or container refuses. With a mount namespace, `work_root` gets a
// private tmpfs. With a PID namespace the process forks: the parent stays behind as a shim that only
// waits (its pid is what the pool knows; killing it kills the namespace), and the child returns as
// PID 1 of the namespace and mounts a fresh /proc there, so every later child of the worker sees only
// the worker's own processes. Call before any thread exists and with the GIL held.
NamespaceState enter_worker_namespaces(const std::string& work_root);

// In the worker's mount namespace: covers the directory `path` with an empty read-only tmpfs, so its
// test children see nothing there (this package's data in site-packages). Throws on failure.
void hide_directory(const std::string& path);

}  // namespace sandbox
