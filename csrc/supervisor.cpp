#include "supervisor.h"

#include <cerrno>
#include <csignal>
#include <ctime>
#include <poll.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "unique_fd.h"

namespace sandbox {
namespace {

double seconds(const timeval& t) { return static_cast<double>(t.tv_sec) + t.tv_usec / 1e6; }

// Sleeps until the child exits or the deadline passes: on a pidfd where the kernel has them, else in
// short naps. Returns false when the deadline passed first.
bool wait_until_exit(pid_t pid, long long deadline_ns) {
  UniqueFd pidfd(static_cast<int>(syscall(SYS_pidfd_open, pid, 0)));
  for (;;) {
    const long long left_ns = deadline_ns - monotonic_ns();
    if (left_ns <= 0) return false;
    if (pidfd) {
      struct pollfd entry = {pidfd.get(), POLLIN, 0};
      const int ready = poll(&entry, 1, static_cast<int>((left_ns + 999999) / 1000000));
      if (ready > 0) return true;
      if (ready < 0 && errno != EINTR) throw_errno("poll(pidfd)");
      continue;
    }
    siginfo_t info = {};
    if (waitid(P_PID, static_cast<id_t>(pid), &info, WEXITED | WNOHANG | WNOWAIT) != 0) throw_errno("waitid");
    if (info.si_pid == pid) return true;
    const struct timespec nap = {0, 500000};
    nanosleep(&nap, nullptr);
  }
}

}  // namespace

long long monotonic_ns() {
  struct timespec now;
  clock_gettime(CLOCK_MONOTONIC, &now);
  return static_cast<long long>(now.tv_sec) * 1000000000LL + now.tv_nsec;
}

ChildOutcome supervise_child(pid_t pid, double timeout_seconds, long long start_ns) {
  ChildOutcome outcome;
  const long long deadline_ns = start_ns + static_cast<long long>(timeout_seconds * 1e9);
  if (!wait_until_exit(pid, deadline_ns)) {
    outcome.timed_out = true;
    kill(-pid, SIGKILL);  // the group: threads die with the process, and seccomp forbids forks
    kill(pid, SIGKILL);
  }
  int status = 0;
  struct rusage usage = {};
  while (wait4(pid, &status, 0, &usage) < 0) {
    if (errno != EINTR) throw_errno("wait4");
  }
  outcome.wall_seconds = static_cast<double>(monotonic_ns() - start_ns) / 1e9;
  outcome.cpu_seconds = seconds(usage.ru_utime) + seconds(usage.ru_stime);
  outcome.max_rss_kb = usage.ru_maxrss;
  if (WIFEXITED(status)) outcome.exit_code = WEXITSTATUS(status);
  if (WIFSIGNALED(status)) outcome.signal = WTERMSIG(status);
  return outcome;
}

}  // namespace sandbox
