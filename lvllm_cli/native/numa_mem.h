// Node-placed memory.  libnuma is opened at run time (dlopen) so the module
// loads, and works, on machines without it; allocation then falls back to
// plain (first-touch) memory.
#pragma once
#include <cstddef>
#include <string>

namespace lk {

struct NumaStatus {
  bool library_loaded = false;  // libnuma.so.1 opened and numa_available() >= 0
  int max_node = 0;             // highest node id the kernel reports (0 without libnuma)
  std::string detail;
};

const NumaStatus& numa_status();

// Large, page-aligned, zero-filled allocation placed on `node` (node < 0: no
// placement).  Transparent huge pages are requested: expert weights are
// streamed and TLB misses cost bandwidth.
void* node_alloc(size_t bytes, int node);
void node_free(void* p, size_t bytes);

// Owning handle for node_alloc memory.
class NodeBuffer {
 public:
  NodeBuffer() = default;
  NodeBuffer(size_t bytes, int node) { reset(bytes, node); }
  ~NodeBuffer() { release(); }
  NodeBuffer(const NodeBuffer&) = delete;
  NodeBuffer& operator=(const NodeBuffer&) = delete;
  NodeBuffer(NodeBuffer&& o) noexcept { *this = static_cast<NodeBuffer&&>(o); }
  NodeBuffer& operator=(NodeBuffer&& o) noexcept {
    if (this != &o) {
      release();
      ptr_ = o.ptr_; bytes_ = o.bytes_; node_ = o.node_;
      o.ptr_ = nullptr; o.bytes_ = 0;
    }
    return *this;
  }
  void reset(size_t bytes, int node);
  // Grow (never shrink) to at least `bytes`; contents are not kept.
  void ensure(size_t bytes, int node);
  void release();
  void* data() const { return ptr_; }
  size_t size() const { return bytes_; }
  template <class T> T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
  int node_ = -1;
};

}  // namespace lk
