// The test child's directory: a fresh tmpfs per test where the worker may mount (its own mount
// namespace), so cleanup is one unmount whatever the program left there (deep trees, a million hard
// links); elsewhere one directory, emptied after each test without recursion.
#pragma once

#include <cstdint>
#include <string>
#include <sys/types.h>

namespace sandbox {

struct TestDirLimits {
  uint64_t size_bytes = 64ULL << 20;  // tmpfs size: all files of one test together
  uint64_t inodes = 16384;            // tmpfs inodes: files, directories and (on tmpfs) hard links
};

// Makes the mount at `path` read-only (the worker's tmpfs, once its test directory exists): a program
// granted writes beneath it by Landlock can then write only inside the test's own tmpfs.
void make_read_only(const std::string& path);

// Mounts a new tmpfs on `path` owned by uid:gid, mode 0700, nosuid/nodev/noexec. Throws on failure.
void mount_test_dir(const std::string& path, uid_t uid, gid_t gid, const TestDirLimits& limits);

// Detaches the tmpfs on `path`; the kernel frees it once nothing uses it. Throws on failure.
void unmount_test_dir(const std::string& path);

// Deletes everything below `path` (not `path` itself), iteratively: depth costs memory for one name a
// level, never stack or file descriptors. Symbolic links are removed, never followed. Throws on failure.
void empty_directory(const std::string& path);

}  // namespace sandbox
