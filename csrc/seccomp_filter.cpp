#include "seccomp_filter.h"

#include <cerrno>
#include <cstddef>
#include <cstdint>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sched.h>
#include <sys/ioctl.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <vector>

namespace sandbox {
namespace {

#if defined(__x86_64__)
constexpr uint32_t kArch = AUDIT_ARCH_X86_64;
#elif defined(__aarch64__)
constexpr uint32_t kArch = AUDIT_ARCH_AARCH64;
#else
#error "stepcoder's sandbox supports x86_64 and aarch64"
#endif

constexpr uint32_t kNrOffset = offsetof(struct seccomp_data, nr);
constexpr uint32_t kArchOffset = offsetof(struct seccomp_data, arch);
// Low 32 bits of the first and second arguments: pids, clone flags and ioctl requests are 32-bit, and
// the kernel truncates the register.
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
constexpr uint32_t kArg0Low = offsetof(struct seccomp_data, args[0]);
constexpr uint32_t kArg1Low = offsetof(struct seccomp_data, args[1]);
#else
constexpr uint32_t kArg0Low = offsetof(struct seccomp_data, args[0]) + 4;
constexpr uint32_t kArg1Low = offsetof(struct seccomp_data, args[1]) + 4;
#endif

constexpr uint32_t kKill = SECCOMP_RET_KILL_PROCESS;
constexpr uint32_t kAllow = SECCOMP_RET_ALLOW;
constexpr uint32_t kNoSys = SECCOMP_RET_ERRNO | (ENOSYS & SECCOMP_RET_DATA);

// Syscalls no test program needs and every escape uses: new processes and programs, the network,
// other processes' memory, the kernel's administrative surface, io_uring (invisible to seccomp), and
// SysV / POSIX message-queue IPC (objects that outlive the program and would carry data to the next job).
constexpr long kDenied[] = {
    SYS_socket, SYS_socketpair, SYS_execve, SYS_execveat, SYS_ptrace, SYS_process_vm_readv,
    SYS_process_vm_writev, SYS_mount, SYS_umount2, SYS_kexec_load, SYS_bpf, SYS_perf_event_open,
    SYS_keyctl, SYS_add_key, SYS_request_key, SYS_unshare, SYS_setns, SYS_pivot_root, SYS_chroot,
    SYS_init_module, SYS_finit_module, SYS_delete_module, SYS_reboot, SYS_swapon, SYS_swapoff,
    SYS_acct, SYS_settimeofday, SYS_clock_settime, SYS_clock_adjtime, SYS_adjtimex, SYS_sethostname,
    SYS_setdomainname, SYS_quotactl, SYS_syslog, SYS_open_by_handle_at, SYS_name_to_handle_at,
    SYS_userfaultfd, SYS_kcmp, SYS_rt_sigqueueinfo, SYS_rt_tgsigqueueinfo, SYS_tkill,
#ifdef SYS_fork
    SYS_fork,
#endif
#ifdef SYS_vfork
    SYS_vfork,
#endif
#ifdef SYS_kexec_file_load
    SYS_kexec_file_load,
#endif
#ifdef SYS_iopl
    SYS_iopl, SYS_ioperm,
#endif
#ifdef SYS_io_uring_setup
    SYS_io_uring_setup, SYS_io_uring_enter, SYS_io_uring_register,
#endif
#ifdef SYS_pidfd_open
    SYS_pidfd_open, SYS_pidfd_send_signal, SYS_pidfd_getfd,
#endif
#ifdef SYS_open_tree
    SYS_open_tree, SYS_move_mount, SYS_fsopen, SYS_fsconfig, SYS_fsmount, SYS_fspick,
#endif
#ifdef SYS_mount_setattr
    SYS_mount_setattr,
#endif
#ifdef SYS_process_madvise
    SYS_process_madvise,
#endif
    SYS_shmget, SYS_shmat, SYS_shmdt, SYS_shmctl, SYS_msgget, SYS_msgsnd, SYS_msgrcv, SYS_msgctl,
    SYS_semget, SYS_semop, SYS_semctl, SYS_semtimedop, SYS_mq_open, SYS_mq_unlink, SYS_mq_timedsend,
    SYS_mq_timedreceive, SYS_mq_notify, SYS_mq_getsetattr,
};

// ioctl requests that act on a terminal beyond the caller: typing into its input queue (TIOCSTI, the
// classic escape from a sandbox sharing the user's terminal), the console's special functions, and
// redirecting the console.
constexpr uint32_t kDeniedIoctls[] = {TIOCSTI, TIOCLINUX, TIOCCONS};

// Syscalls whose first argument is a pid: allowed only for the child itself (or 0 = itself/own group).
constexpr long kSelfTargeted[] = {SYS_kill, SYS_tgkill, SYS_prlimit64};

class FilterBuilder {
 public:
  void load(uint32_t offset) { add(BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offset)); }
  void ret(uint32_t action) { add(BPF_STMT(BPF_RET | BPF_K, action)); }
  // Conditional jumps: on true skip `on_true` instructions, else skip `on_false`.
  void jump_equal(uint32_t value, uint8_t on_true, uint8_t on_false) {
    add(BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, value, on_true, on_false));
  }
  void jump_greater_equal(uint32_t value, uint8_t on_true, uint8_t on_false) {
    add(BPF_JUMP(BPF_JMP | BPF_JGE | BPF_K, value, on_true, on_false));
  }
  void jump_bits_set(uint32_t bits, uint8_t on_true, uint8_t on_false) {
    add(BPF_JUMP(BPF_JMP | BPF_JSET | BPF_K, bits, on_true, on_false));
  }
  const std::vector<sock_filter>& program() const { return program_; }

 private:
  void add(sock_filter instruction) { program_.push_back(instruction); }
  std::vector<sock_filter> program_;
};

std::vector<sock_filter> build_filter(pid_t self) {
  FilterBuilder f;
  f.load(kArchOffset);
  f.jump_equal(kArch, 1, 0);
  f.ret(kKill);  // a foreign syscall ABI would bypass every number below
  f.load(kNrOffset);
#if defined(__x86_64__)
  f.jump_greater_equal(0x40000000u, 0, 1);  // x32 ABI numbers alias x86_64 ones
  f.ret(kKill);
#endif
  for (long nr : kDenied) {
    f.jump_equal(static_cast<uint32_t>(nr), 0, 1);
    f.ret(kKill);
  }
#ifdef SYS_clone3
  f.jump_equal(SYS_clone3, 0, 1);
  f.ret(kNoSys);
#endif
  // clone: only threads (CLONE_THREAD); a new process is a fork.
  f.jump_equal(SYS_clone, 0, 4);
  f.load(kArg0Low);
  f.jump_bits_set(CLONE_THREAD, 1, 0);
  f.ret(kKill);
  f.ret(kAllow);
  // ioctl: every request but the terminal ones above.
  constexpr uint8_t kIoctls = sizeof(kDeniedIoctls) / sizeof(kDeniedIoctls[0]);
  f.jump_equal(SYS_ioctl, 0, kIoctls + 3);
  f.load(kArg1Low);
  for (uint8_t index = 0; index < kIoctls; ++index) {
    f.jump_equal(kDeniedIoctls[index], kIoctls - index, 0);  // to the kill below the allow
  }
  f.ret(kAllow);
  f.ret(kKill);
  for (long nr : kSelfTargeted) {
    f.jump_equal(static_cast<uint32_t>(nr), 0, 5);
    f.load(kArg0Low);
    f.jump_equal(0, 2, 0);
    f.jump_equal(static_cast<uint32_t>(self), 1, 0);
    f.ret(kKill);
    f.ret(kAllow);
  }
  f.ret(kAllow);
  return f.program();
}

}  // namespace

const char* install_seccomp_filter(pid_t self) noexcept {
  if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0) return "PR_SET_NO_NEW_PRIVS";
  std::vector<sock_filter> filter;
  try {
    filter = build_filter(self);
  } catch (...) {
    errno = ENOMEM;
    return "building the seccomp filter";
  }
  const struct sock_fprog program = {static_cast<unsigned short>(filter.size()), filter.data()};
  if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &program) != 0) {
    return "seccomp(SECCOMP_SET_MODE_FILTER)";
  }
  return nullptr;
}

bool seccomp_available() noexcept {
  // PR_GET_SECCOMP fails with EINVAL on kernels built without seccomp.
  return prctl(PR_GET_SECCOMP, 0, 0, 0, 0) >= 0;
}

}  // namespace sandbox
