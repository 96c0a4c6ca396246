#include "supervisor.h"

#include <algorithm>
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

// The child's CPU time so far (every thread), or -1 once it can no longer be read (it has exited).
long long cpu_ns(clockid_t clock) {
  struct timespec used;
  if (clock_gettime(clock, &used) != 0) return -1;
  return static_cast<long long>(used.tv_sec) * 1000000000LL + used.tv_nsec;
}

// Sleeps until the child exits (true) or a limit passes (false, and which one in `kind`). The child
// cannot use more CPU time than its CPUs give in the time slept, so each nap lasts the CPU time left
// spread over the online CPUs: a program that waits costs no wake-ups, one that spins on every CPU is
// caught within a millisecond or so of CPU time per CPU. Naps are on a pidfd where the kernel has them,
// else short and fixed.
bool wait_until_exit(pid_t pid, long long cpu_limit_ns, long long deadline_ns, TimeoutKind* kind) {
  UniqueFd pidfd(static_cast<int>(syscall(SYS_pidfd_open, pid, 0)));
  clockid_t clock;
  const bool have_clock = clock_getcpuclockid(pid, &clock) == 0;
  static const long cpus = std::max(1L, sysconf(_SC_NPROCESSORS_ONLN));  // glibc reads /sys for it
  for (;;) {
    const long long wall_left_ns = deadline_ns - monotonic_ns();
    if (wall_left_ns <= 0) {
      *kind = TimeoutKind::kWall;
      return false;
    }
    long long nap_ns = wall_left_ns;
    const long long used_ns = have_clock ? cpu_ns(clock) : -1;
    if (used_ns >= 0) {
      if (used_ns >= cpu_limit_ns) {
        *kind = TimeoutKind::kCpu;
        return false;
      }
      nap_ns = std::min(nap_ns, std::max(1000000LL, (cpu_limit_ns - used_ns) / cpus));
    }
    if (pidfd) {
      struct pollfd entry = {pidfd.get(), POLLIN, 0};
      const int ready = poll(&entry, 1, static_cast<int>(std::min<long long>((nap_ns + 999999) / 1000000, 1 << 30)));
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

ChildOutcome supervise_child(pid_t pid, double cpu_seconds, double wall_seconds, long long start_ns) {
  ChildOutcome outcome;
  const long long cpu_limit_ns = static_cast<long long>(cpu_seconds * 1e9);
  const long long deadline_ns = start_ns + static_cast<long long>(wall_seconds * 1e9);
  if (!wait_until_exit(pid, cpu_limit_ns, deadline_ns, &outcome.timed_out)) {
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
