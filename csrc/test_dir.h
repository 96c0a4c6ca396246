// The test child's directory, emptied after each test without recursion, whatever the program left
// there (a deep tree, a flood of hard links). Where the worker may mount (its own mount namespace) it is
// a tmpfs of its own whose size and inode caps bound what a test can leave, and so what emptying costs.
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
// granted writes beneath it by Landlock can then write only inside the test directory's own tmpfs.
void make_read_only(const std::string& path);

// Mounts a new tmpfs on `path` owned by uid:gid, mode 0700, nosuid/nodev/noexec. Throws on failure.
void mount_test_dir(const std::string& path, uid_t uid, gid_t gid, const TestDirLimits& limits);

// Deletes everything below `path` (not `path` itself), iteratively: depth costs memory for one name a
// level, never stack or file descriptors. Symbolic links are removed, never followed. Throws on failure.
void empty_directory(const std::string& path);

}  // namespace sandbox
