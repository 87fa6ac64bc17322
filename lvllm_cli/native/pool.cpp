#include "pool.h"

#include "common.h"

#include <linux/futex.h>
#include <pthread.h>
#include <sched.h>
#include <sys/syscall.h>
#include <unistd.h>

#if defined(LK_X86)
#include <immintrin.h>
#define LK_PAUSE() _mm_pause()
#else
#define LK_PAUSE() std::atomic_signal_fence(std::memory_order_seq_cst)
#endif

namespace lk {

namespace {
void futex_wait(std::atomic<uint32_t>* addr, uint32_t expected) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAIT_PRIVATE, expected, nullptr, nullptr, 0);
}
void futex_wake_all(std::atomic<uint32_t>* addr) {
  syscall(SYS_futex, reinterpret_cast<uint32_t*>(addr), FUTEX_WAKE_PRIVATE, 0x7fffffff, nullptr, nullptr, 0);
}
}  // namespace

Pool::Pool(std::vector<NodeGroup> groups, int spin_us) : groups_(std::move(groups)), spin_ns_(long(spin_us) * 1000) {
  group_barriers_ = std::vector<SpinBarrier>(groups_.size());
  for (size_t g = 0; g < groups_.size(); ++g) {
    first_.push_back(total_);
    group_barriers_[g].parties = int(groups_[g].cpus.size());
    total_ += int(groups_[g].cpus.size());
  }
  all_barrier_.parties = total_;
  for (size_t g = 0; g < groups_.size(); ++g) {
    for (size_t l = 0; l < groups_[g].cpus.size(); ++l) {
      Worker* w = new Worker();
      w->info = WorkerInfo{int(workers_.size()), int(g), int(l)};
      w->cpu = groups_[g].cpus[l];
      workers_.push_back(w);
    }
  }
  for (Worker* w : workers_) w->thread = std::thread(&Pool::worker_main, this, w);
}

Pool::~Pool() {
  if (!done()) wait();
  stop_.store(true, std::memory_order_release);
  job_seq_.fetch_add(1, std::memory_order_acq_rel);
  futex_wake_all(&job_seq_);
  for (Worker* w : workers_) {
    if (w->thread.joinable()) w->thread.join();
    delete w;
  }
}

void Pool::worker_main(Worker* w) {
  if (w->cpu >= 0) {
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w->cpu, &set);
    if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set) != 0) unpinned_.fetch_add(1);
  }
  uint32_t seen = 0;
  for (;;) {
    uint32_t seq = job_seq_.load(std::memory_order_acquire);
    if (seq == seen) {
      int64_t deadline = now_ns() + spin_ns_;
      int n = 0;
      const bool doorman = w->info.gid == 0;
      while ((seq = job_seq_.load(std::memory_order_acquire)) == seen) {
        LK_PAUSE();
        if (doorman) {
          const uint32_t* bell = bell_.load(std::memory_order_acquire);
          const uint32_t v = bell ? __atomic_load_n(bell, __ATOMIC_ACQUIRE) : 0;
          if (v) ring_.load(std::memory_order_acquire)(ring_ctx_, v);
        }
        if ((++n & 255) == 0 && now_ns() > deadline) {
          sleepers_.fetch_add(1);  // seq_cst: pairs with submit()'s increment/read
          while ((seq = job_seq_.load(std::memory_order_acquire)) == seen) futex_wait(&job_seq_, seen);
          sleepers_.fetch_sub(1, std::memory_order_acq_rel);
          break;
        }
      }
    }
    seen = seq;
    if (stop_.load(std::memory_order_acquire)) return;
    fn_(ctx_, w->info);
    if (remaining_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      uint32_t* flag = done_flag_;
      done_seq_.store(seen);
      if (flag) __atomic_store_n(flag, 1u, __ATOMIC_RELEASE);  // after done_seq_: a ring that follows finds the pool done
      if (waiter_sleeping_.load()) futex_wake_all(&done_seq_);
    }
  }
}

void Pool::submit(JobFn fn, void* ctx, uint32_t* done_flag) {
  if (!done()) wait();
  fn_ = fn;
  ctx_ = ctx;
  done_flag_ = done_flag;
  remaining_.store(total_, std::memory_order_relaxed);
  job_seq_.fetch_add(1);
  if (sleepers_.load() > 0) futex_wake_all(&job_seq_);
}

void Pool::watch_doorbell(uint32_t* bell, RingFn ring, void* ctx) {
  bell_.store(nullptr, std::memory_order_release);  // never a new bell with the old ring
  ring_ctx_ = ctx;
  ring_.store(ring, std::memory_order_release);
  bell_.store(bell, std::memory_order_release);
}

void Pool::wait() {
  int64_t deadline = now_ns() + spin_ns_;
  for (int n = 1;; ++n) {
    uint32_t target = job_seq_.load(std::memory_order_acquire);
    uint32_t d = done_seq_.load(std::memory_order_acquire);
    if (d == target) return;
    if ((n & 255) != 0) {
      LK_PAUSE();
      continue;
    }
    if (now_ns() <= deadline) {
      // If a worker shares our core, let it run instead of spinning it off the CPU.
      sched_yield();
      continue;
    }
    waiter_sleeping_.store(1);
    // Re-check after announcing (seq_cst), so a completion in between is not missed.
    d = done_seq_.load();
    if (d != target) {
      struct timespec ts = {0, 1000000};  // 1 ms cap: robust against a lost wake-up
      syscall(SYS_futex, reinterpret_cast<uint32_t*>(&done_seq_), FUTEX_WAIT_PRIVATE, d, &ts, nullptr, 0);
    }
    waiter_sleeping_.store(0);
  }
}

bool Pool::keep_caller_off_workers() {
  cpu_set_t allowed;
  CPU_ZERO(&allowed);
  if (pthread_getaffinity_np(pthread_self(), sizeof(allowed), &allowed) != 0) return false;
  for (const NodeGroup& g : groups_)
    for (int c : g.cpus)
      if (c >= 0 && c < CPU_SETSIZE) CPU_CLR(c, &allowed);
  if (CPU_COUNT(&allowed) == 0) return false;
  return pthread_setaffinity_np(pthread_self(), sizeof(allowed), &allowed) == 0;
}

void Pool::barrier(SpinBarrier& b, int& sense) {
  sense ^= 1;
  if (b.count.fetch_add(1, std::memory_order_acq_rel) == b.parties - 1) {
    b.count.store(0, std::memory_order_relaxed);
    b.sense.store(sense, std::memory_order_release);
    return;
  }
  int n = 0;
  while (b.sense.load(std::memory_order_acquire) != sense) {
    LK_PAUSE();
    // More workers than free cores (tests, oversubscribed boxes): let the
    // stragglers run instead of spinning them off the CPU.
    if (++n > 4096) sched_yield();
  }
}

void Pool::barrier_group(const WorkerInfo& w) { barrier(group_barriers_[w.group], workers_[w.gid]->group_sense); }
void Pool::barrier_all(const WorkerInfo& w) { barrier(all_barrier_, workers_[w.gid]->all_sense); }

}  // namespace lk
