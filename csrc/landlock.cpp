#include "landlock.h"

#include <cerrno>
#include <cstdint>
#include <fcntl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "unique_fd.h"

namespace sandbox {
namespace {

// Values from linux/landlock.h, spelled out so older kernel headers still build.
constexpr uint32_t kCreateRulesetVersion = 1U << 0;
constexpr int kRulePathBeneath = 1;
constexpr uint64_t kWriteFile = 1ULL << 1;
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

uint64_t write_rights(int abi) {
  uint64_t rights = kWriteFile | kRemoveDir | kRemoveFile | kMakeChar | kMakeDir | kMakeReg | kMakeSock |
                    kMakeFifo | kMakeBlock | kMakeSym;
  if (abi >= 2) rights |= kRefer;
  if (abi >= 3) rights |= kTruncate;
  return rights;
}

bool add_path_rule(int ruleset, int path_fd, uint64_t rights) {
  const PathBeneathAttr rule = {rights, path_fd};
  return syscall(SYS_landlock_add_rule, ruleset, kRulePathBeneath, &rule, 0) == 0;
}

}  // namespace

int landlock_abi() noexcept {
  const long abi = create_ruleset(nullptr, 0, kCreateRulesetVersion);
  return abi < 0 ? 0 : static_cast<int>(abi);
}

const char* restrict_writes_to(int dir_fd) noexcept {
  const int abi = landlock_abi();
  if (abi == 0) {
    errno = EOPNOTSUPP;
    return "landlock_create_ruleset(VERSION)";
  }
  const uint64_t handled = write_rights(abi);
  const RulesetAttr attr = {handled};
  UniqueFd ruleset(static_cast<int>(create_ruleset(&attr, sizeof(attr), 0)));
  if (!ruleset) return "landlock_create_ruleset";
  if (!add_path_rule(ruleset.get(), dir_fd, handled)) return "landlock_add_rule(workdir)";
  UniqueFd dev_null(open("/dev/null", O_PATH | O_CLOEXEC));
  const uint64_t file_rights = kWriteFile | (abi >= 3 ? kTruncate : 0);
  if (dev_null && !add_path_rule(ruleset.get(), dev_null.get(), file_rights)) return "landlock_add_rule(/dev/null)";
  if (syscall(SYS_landlock_restrict_self, ruleset.get(), 0) != 0) return "landlock_restrict_self";
  return nullptr;
}

}  // namespace sandbox
