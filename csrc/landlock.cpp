#include "landlock.h"

#include <cerrno>
#include <cstdint>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "unique_fd.h"

namespace sandbox {
namespace {

// Values from linux/landlock.h, spelled out so older kernel headers still build.
constexpr uint32_t kCreateRulesetVersion = 1U << 0;
constexpr int kRulePathBeneath = 1;
constexpr uint64_t kExecute = 1ULL << 0;
constexpr uint64_t kWriteFile = 1ULL << 1;
constexpr uint64_t kReadFile = 1ULL << 2;
constexpr uint64_t kReadDir = 1ULL << 3;
constexpr uint64_t kRemoveDir = 1ULL << 4;
constexpr uint64_t kRemoveFile = 1ULL << 5;
constexpr uint64_t kMakeChar = 1ULL << 6;
constexpr uint64_t kMakeDir = 1ULL << 7;
constexpr uint64_t kMakeReg = 1ULL << 8;
constexpr uint64_t kMakeSock = 1ULL << 9;
constexpr uint64_t kMakeFifo = 1ULL << 10;
constexpr uint64_t kMakeBlock = 1ULL << 11;
constexpr uint64_t kMakeSym = 1ULL << 12;
constexpr uint64_t kRefer = 1ULL << 13;     // ABI 2
constexpr uint64_t kTruncate = 1ULL << 14;  // ABI 3
constexpr uint64_t kIoctlDev = 1ULL << 15;  // ABI 5

// Rights that make sense on a file (the kernel refuses directory rights on one).
constexpr uint64_t kFileRights = kExecute | kWriteFile | kReadFile | kTruncate | kIoctlDev;

struct RulesetAttr {
  uint64_t handled_access_fs;
};

struct __attribute__((packed)) PathBeneathAttr {
  uint64_t allowed_access;
  int32_t parent_fd;
};

long create_ruleset(const RulesetAttr* attr, size_t size, uint32_t flags) {
  return syscall(SYS_landlock_create_ruleset, attr, size, flags);
}

uint64_t handled_rights(int abi) {
  uint64_t rights = kExecute | kWriteFile | kReadFile | kReadDir | kRemoveDir | kRemoveFile | kMakeChar | kMakeDir |
                    kMakeReg | kMakeSock | kMakeFifo | kMakeBlock | kMakeSym;
  if (abi >= 2) rights |= kRefer;
  if (abi >= 3) rights |= kTruncate;
  if (abi >= 5) rights |= kIoctlDev;
  return rights;
}

// Adds a rule for `path` with `rights` (trimmed to file rights on a non-directory); a missing path is
// skipped, since the same list serves distributions that lay out /lib and /usr/lib differently.
void add_rule(int ruleset, const std::string& path, uint64_t rights) {
  UniqueFd fd(open(path.c_str(), O_PATH | O_CLOEXEC));
  if (!fd) {
    if (errno == ENOENT || errno == ENOTDIR) return;
    throw_errno("open(" + path + ")");
  }
  struct stat info;
  if (fstat(fd.get(), &info) != 0) throw_errno("fstat(" + path + ")");
  if (!S_ISDIR(info.st_mode)) rights &= kFileRights;
  const PathBeneathAttr rule = {rights, fd.get()};
  if (syscall(SYS_landlock_add_rule, ruleset, kRulePathBeneath, &rule, 0) != 0) {
    throw_errno("landlock_add_rule(" + path + ")");
  }
}

}  // namespace

int landlock_abi() noexcept {
  const long abi = create_ruleset(nullptr, 0, kCreateRulesetVersion);
  return abi < 0 ? 0 : static_cast<int>(abi);
}

int build_landlock_ruleset(const LandlockRules& rules) {
  const int abi = landlock_abi();
  if (abi == 0) {
    errno = EOPNOTSUPP;
    throw_errno("landlock_create_ruleset(VERSION)");
  }
  const uint64_t handled = handled_rights(abi);
  const RulesetAttr attr = {handled};
  UniqueFd ruleset(static_cast<int>(create_ruleset(&attr, sizeof(attr), 0)));
  if (!ruleset) throw_errno("landlock_create_ruleset");
  // The test's own directory: everything but executing, device nodes and device ioctls.
  add_rule(ruleset.get(), rules.test_dir, handled & ~(kExecute | kMakeChar | kMakeBlock | kIoctlDev));
  for (const std::string& path : rules.read) add_rule(ruleset.get(), path, kReadFile | kReadDir);
  for (const std::string& path : rules.list) add_rule(ruleset.get(), path, kReadDir);
  for (const std::string& path : rules.read_write) {
    add_rule(ruleset.get(), path, kReadFile | kWriteFile | (abi >= 3 ? kTruncate : 0));
  }
  return ruleset.release();
}

const char* landlock_restrict_self(int ruleset_fd) noexcept {
  if (syscall(SYS_landlock_restrict_self, ruleset_fd, 0U) != 0) return "landlock_restrict_self";
  return nullptr;
}

}  // namespace sandbox
