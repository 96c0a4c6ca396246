// The worker's side of one test child: wall-clock deadline from outside, reaping, usage.
#pragma once

#include <sys/types.h>

namespace sandbox {

struct ChildOutcome {
  bool timed_out = false;  // the deadline passed and the supervisor killed the child's group
  int exit_code = -1;      // when it exited
  int signal = 0;          // when a signal ended it (SIGKILL after a timeout included)
  double wall_seconds = 0;
  double cpu_seconds = 0;  // user + system
  long max_rss_kb = 0;
};

// Waits for `pid` (a child of the caller, leader of its own process group) until `timeout_seconds`
// after `start_ns` (CLOCK_MONOTONIC), then SIGKILLs the group. Always reaps. Call without the GIL.
ChildOutcome supervise_child(pid_t pid, double timeout_seconds, long long start_ns);

long long monotonic_ns();

}  // namespace sandbox
