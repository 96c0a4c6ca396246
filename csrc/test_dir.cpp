#include "test_dir.h"

#include <cerrno>
#include <cstring>
#include <dirent.h>
#include <fcntl.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <unistd.h>
#include <vector>

#include "unique_fd.h"

namespace sandbox {
namespace {

class Directory {
 public:
  // Takes ownership of `fd` (a directory opened for reading).
  explicit Directory(int fd) : stream_(fdopendir(fd)) {
    if (stream_ == nullptr) {
      const int saved = errno;
      close(fd);
      errno = saved;
      throw_errno("fdopendir");
    }
  }
  ~Directory() { closedir(stream_); }
  Directory(const Directory&) = delete;
  Directory& operator=(const Directory&) = delete;

  // The next entry other than "." and "..", or nullptr at the end.
  const dirent* next() {
    for (;;) {
      errno = 0;
      const dirent* entry = readdir(stream_);
      if (entry == nullptr) {
        if (errno != 0) throw_errno("readdir");
        return nullptr;
      }
      if (std::strcmp(entry->d_name, ".") != 0 && std::strcmp(entry->d_name, "..") != 0) return entry;
    }
  }

 private:
  DIR* stream_;
};

int open_directory(int parent, const char* name) {
  const int fd = openat(parent, name, O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC);
  if (fd < 0) throw_errno(std::string("openat(") + name + ")");
  return fd;
}

bool is_directory(int parent, const dirent* entry) {
  if (entry->d_type != DT_UNKNOWN) return entry->d_type == DT_DIR;
  struct stat info;
  if (fstatat(parent, entry->d_name, &info, AT_SYMLINK_NOFOLLOW) != 0) throw_errno("fstatat");
  return S_ISDIR(info.st_mode);
}

}  // namespace

void make_read_only(const std::string& path) {
  if (mount(nullptr, path.c_str(), nullptr, MS_REMOUNT | MS_BIND | MS_RDONLY | MS_NOSUID | MS_NODEV, nullptr) != 0) {
    throw_errno("mount(MS_REMOUNT | MS_RDONLY, " + path + ")");
  }
}

void mount_test_dir(const std::string& path, uid_t uid, gid_t gid, const TestDirLimits& limits) {
  const std::string options = "mode=0700,uid=" + std::to_string(uid) + ",gid=" + std::to_string(gid) +
                              ",size=" + std::to_string(limits.size_bytes) +
                              ",nr_inodes=" + std::to_string(limits.inodes);
  if (mount("stepcoder-test", path.c_str(), "tmpfs", MS_NOSUID | MS_NODEV | MS_NOEXEC, options.c_str()) != 0) {
    throw_errno("mount(tmpfs, " + path + ")");
  }
}

void empty_directory(const std::string& path) {
  // `names` holds the path from `path` down to the directory being emptied; `current` is open on it.
  std::vector<std::string> names;
  UniqueFd current(open(path.c_str(), O_RDONLY | O_DIRECTORY | O_NOFOLLOW | O_CLOEXEC));
  if (!current) throw_errno("open(" + path + ")");
  for (;;) {
    std::string subdirectory;
    {
      Directory listing(dup(current.get()));
      while (const dirent* entry = listing.next()) {
        if (is_directory(current.get(), entry)) {
          subdirectory = entry->d_name;
          break;
        }
        if (unlinkat(current.get(), entry->d_name, 0) != 0) throw_errno("unlinkat");
      }
    }
    if (!subdirectory.empty()) {  // descend; it is removed once it is empty
      current.reset(open_directory(current.get(), subdirectory.c_str()));
      names.push_back(std::move(subdirectory));
      continue;
    }
    if (names.empty()) return;  // `path` itself is empty
    UniqueFd parent(open_directory(current.get(), ".."));
    if (unlinkat(parent.get(), names.back().c_str(), AT_REMOVEDIR) != 0) throw_errno("unlinkat(AT_REMOVEDIR)");
    names.pop_back();
    current = std::move(parent);
  }
}

}  // namespace sandbox
