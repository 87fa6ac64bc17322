// Persistent worker pool, one pinned subpool per NUMA node.
//
// Workers spin briefly on the job counter, then sleep on a futex: the MoE
// layers of one forward pass arrive back to back (spinning keeps wake-up at
// ~1 us), while an idle server must not burn cores.
#pragma once
#include <atomic>
#include <cstdint>
#include <string>
#include <thread>
#include <vector>

namespace lk {

struct NodeGroup {
  int numa_node = -1;     // real node whose memory this group uses; -1: no placement
  std::vector<int> cpus;  // one worker per entry, pinned to it; -1: not pinned
};

struct WorkerInfo {
  int gid;    // global worker index
  int group;  // index into the pool's groups
  int lid;    // index within the group
};

using JobFn = void (*)(void* ctx, const WorkerInfo& w);

struct alignas(64) SpinBarrier {
  std::atomic<int> count{0};
  std::atomic<int> sense{0};
  int parties = 1;
  char pad[64 - 3 * sizeof(int)];
};

class Pool {
 public:
  Pool(std::vector<NodeGroup> groups, int spin_us);
  ~Pool();
  Pool(const Pool&) = delete;
  Pool& operator=(const Pool&) = delete;

  int num_groups() const { return int(groups_.size()); }
  int group_size(int g) const { return int(groups_[g].cpus.size()); }
  int group_first(int g) const { return first_[g]; }
  int total() const { return total_; }
  int group_numa_node(int g) const { return groups_[g].numa_node; }
  const std::vector<NodeGroup>& groups() const { return groups_; }
  // Workers whose pinning failed (CPU not allowed to this process).
  int unpinned() const { return unpinned_.load(); }

  // Post a job to every worker and return at once; one job at a time (a
  // second submit waits for the first to finish).  With `done_flag`, the
  // last worker also stores 1 there (release) when the job is done: for a
  // waiter no futex reaches, the GPU polling pinned host memory.
  void submit(JobFn fn, void* ctx, uint32_t* done_flag = nullptr);

  // A word another device writes (the GPU, with a stream memory operation):
  // while worker 0 spins between jobs it reads it and calls ring(ctx, value)
  // whenever it is non-zero (the callee claims it, e.g. by compare-exchange
  // to 0, and may submit a job from there).  Sleeping workers do not watch:
  // whoever writes the word needs another way to get the job posted.
  using RingFn = void (*)(void* ctx, uint32_t value);
  void watch_doorbell(uint32_t* bell, RingFn ring, void* ctx);
  // Wait for the posted job; spins up to spin_us, then sleeps.
  void wait();
  bool done() const { return done_seq_.load(std::memory_order_acquire) == job_seq_.load(std::memory_order_acquire); }

  // Restrict the calling thread to the allowed CPUs no worker is pinned to
  // (when there are any): the thread that submits and waits must never share
  // a core with a spinning worker, or every barrier stalls for a time slice.
  // Returns false when no such CPU exists.
  bool keep_caller_off_workers();

  // Inside a job.
  void barrier_group(const WorkerInfo& w);
  void barrier_all(const WorkerInfo& w);

 private:
  struct alignas(64) Worker {
    std::thread thread;
    WorkerInfo info{};
    int cpu = -1;
    int group_sense = 0;
    int all_sense = 0;
  };

  void worker_main(Worker* w);
  static void barrier(SpinBarrier& b, int& sense);

  std::vector<NodeGroup> groups_;
  std::vector<int> first_;
  int total_ = 0;
  long spin_ns_ = 0;
  std::vector<Worker*> workers_;
  std::vector<SpinBarrier> group_barriers_;
  SpinBarrier all_barrier_;

  alignas(64) std::atomic<uint32_t> job_seq_{0};
  alignas(64) std::atomic<uint32_t> done_seq_{0};
  alignas(64) std::atomic<int> remaining_{0};
  std::atomic<int> sleepers_{0};
  std::atomic<int> waiter_sleeping_{0};
  std::atomic<bool> stop_{false};
  std::atomic<int> unpinned_{0};
  JobFn fn_ = nullptr;
  void* ctx_ = nullptr;
  uint32_t* done_flag_ = nullptr;
  std::atomic<uint32_t*> bell_{nullptr};
  std::atomic<RingFn> ring_{nullptr};
  void* ring_ctx_ = nullptr;
};

}  // namespace lk
