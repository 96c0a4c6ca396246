// The worker's side of one test child: a CPU-time limit and a wall-clock backstop enforced from
// outside, reaping, usage.
#pragma once

#include <sys/types.h>

namespace sandbox {

enum class TimeoutKind { kNone, kCpu, kWall };

struct ChildOutcome {
  TimeoutKind timed_out = TimeoutKind::kNone;  // which limit passed, after which the group was killed
  int exit_code = -1;      // when it exited
  int signal = 0;          // when a signal ended it (SIGKILL after a timeout included)
  double wall_seconds = 0;
  double cpu_seconds = 0;  // user + system, every thread
  long max_rss_kb = 0;
};

// Waits for `pid` (a child of the caller, leader of its own process group) until it has used
// `cpu_seconds` of CPU time (all its threads together, read from its process CPU clock) or until
// `wall_seconds` after `start_ns` (CLOCK_MONOTONIC), whichever comes first, then SIGKILLs the group.
// Always reaps. Call without the GIL.
ChildOutcome supervise_child(pid_t pid, double cpu_seconds, double wall_seconds, long long start_ns);

long long monotonic_ns();

}  // namespace sandbox
