#include "numa_mem.h"

#include <dlfcn.h>
#include <sys/mman.h>

#include <new>

namespace lk {

namespace {
struct NumaLib {
  NumaStatus status;
  void (*tonode_memory)(void*, size_t, int) = nullptr;

  NumaLib() {
    void* h = dlopen("libnuma.so.1", RTLD_NOW | RTLD_LOCAL);
    if (!h) h = dlopen("libnuma.so", RTLD_NOW | RTLD_LOCAL);
    if (!h) {
      status.detail = "libnuma not found: memory is placed by first touch";
      return;
    }
    auto available = reinterpret_cast<int (*)()>(dlsym(h, "numa_available"));
    auto max_node = reinterpret_cast<int (*)()>(dlsym(h, "numa_max_node"));
    tonode_memory = reinterpret_cast<void (*)(void*, size_t, int)>(dlsym(h, "numa_tonode_memory"));
    if (!available || !max_node || !tonode_memory || available() < 0) {
      status.detail = "libnuma loaded but NUMA is not available on this kernel";
      tonode_memory = nullptr;
      return;
    }
    status.library_loaded = true;
    status.max_node = max_node();
    status.detail = "libnuma loaded";
  }
};

NumaLib& lib() {
  static NumaLib l;
  return l;
}
}  // namespace

const NumaStatus& numa_status() { return lib().status; }

void* node_alloc(size_t bytes, int node) {
  if (bytes == 0) return nullptr;
  void* p = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (p == MAP_FAILED) throw std::bad_alloc();
#ifdef MADV_HUGEPAGE
  if (bytes >= (2u << 20)) madvise(p, bytes, MADV_HUGEPAGE);
#endif
  NumaLib& l = lib();
  if (node >= 0 && l.tonode_memory && node <= l.status.max_node) l.tonode_memory(p, bytes, node);
  return p;
}

void node_free(void* p, size_t bytes) {
  if (p) munmap(p, bytes);
}

void NodeBuffer::reset(size_t bytes, int node) {
  release();
  ptr_ = node_alloc(bytes, node);
  bytes_ = bytes;
  node_ = node;
}

void NodeBuffer::ensure(size_t bytes, int node) {
  if (bytes <= bytes_ && node == node_) return;
  reset(bytes, node);
}

void NodeBuffer::release() {
  node_free(ptr_, bytes_);
  ptr_ = nullptr;
  bytes_ = 0;
}

}  // namespace lk
