#include "engine.h"

#include <algorithm>
#include <climits>
#include <array>
#include <stdexcept>

namespace lk {

namespace {

// Rows handed to one panel_dot call: bounds the per-worker y scratch (32 KB)
// and keeps it in L1/L2; a multiple of 32 so AMX tiles stay full.
constexpr int CHUNK = 256;

// Rows of readable slack after every activation matrix: AMX kernels fill a
// 16- or 32-row tile past the last token (see kernels.h).
constexpr size_t SLACK_ROWS = 32;

// Row strides of the scratch matrices, padded by a cache line: rows exactly
// 4 KiB apart all land in one L1 set, and a 16-row AMX tile load (or eight
// broadcast rows) then misses L1 on every row.
inline size_t act_ld(size_t K) { return K + 32; }
inline size_t y_ld(size_t Hp) { return Hp + 16; }

inline uint64_t splitmix64(uint64_t& s) {
  uint64_t z = (s += 0x9e3779b97f4a7c15ull);
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

void convert_row(const void* src, DType st, size_t n, void* dst, DType dt, size_t padded) {
  size_t es = dtype_size(dt);
  if (st == dt) {
    std::memcpy(dst, src, n * es);
  } else if (st == DType::bf16 && dt == DType::f32) {
    const uint16_t* s = static_cast<const uint16_t*>(src);
    float* d = static_cast<float*>(dst);
    for (size_t i = 0; i < n; ++i) d[i] = bf16_to_f32(s[i]);
  } else {
    for (size_t i = 0; i < n; ++i) store_from_f32(dst, i, dt, load_as_f32(src, i, st));
  }
  if (padded > n) std::memset(static_cast<char*>(dst) + n * es, 0, (padded - n) * es);
}

// Guided self-scheduling over [0, n): big grabs first, single items at the
// end, so a worker slowed by the OS or a busy sibling core does not hold
// everyone back at the barrier.
struct alignas(64) WorkCounter {
  std::atomic<int64_t> next{0};
  char pad[64 - sizeof(std::atomic<int64_t>)];
};

inline bool grab(WorkCounter& c, int64_t n, int workers, int64_t* begin, int64_t* end) {
  int64_t cur = c.next.load(std::memory_order_relaxed);
  for (;;) {
    const int64_t left = n - cur;
    if (left <= 0) return false;
    const int64_t take = std::max<int64_t>(1, left / (2 * int64_t(workers)));
    if (c.next.compare_exchange_weak(cur, cur + take, std::memory_order_relaxed)) {
      *begin = cur;
      *end = cur + take;
      return true;
    }
  }
}

}  // namespace

// ---------------------------------------------------------------------------
// The job: one forward call in flight, with the scratch it reuses.
//
// Phases (all workers; barriers between):
//   route    worker 0 sorts the (token, slot) assignments by expert
//   gather   copy each assignment's token row into xg (expert order, kernel format),
//            and into xq as int8 (q8 rows) for int4 layers on int8 activations
//   gate_up  per node group, items (expert, w13 panel): h = silu(gate x) * up x
//   down     per node group, items (expert, w2 panel): y[row] = weight * w2 h
//   reduce   out[m] = sum over slots and groups of y[row(m, slot)]
// Items are handed out dynamically, so no worker waits on a slow one for long.

struct Engine::Job {
  MoELayer* layer = nullptr;
  ForwardArgs a;
  const KernelSet* ks = nullptr;
  size_t act = 2;  // bytes per activation element

  // Routing: assignments sorted by expert.
  std::vector<int> count, offset, active, row_token, slot_row;  // slot_row[m*k+j]: row, or -1
  std::vector<float> row_weight;
  int A = 0;

  NodeBuffer xg;  // [A + slack, act_ld(Hp)] activations, expert-sorted
  NodeBuffer xq;  // the same rows as q8 rows (same byte stride), int8-activation layers only
  struct Group {
    NodeBuffer hbuf;  // [A + slack, act_ld(inp)] silu(gate) * up; q8 rows for experts decoded on int8
    NodeBuffer y;     // [A, y_ld(Hp)] fp32 weighted expert outputs of this group's slice
    WorkCounter gate_up, down;
  };
  std::vector<Group> groups;
  std::vector<NodeBuffer> ybuf;  // per worker [CHUNK + slack, 32] fp32
  std::vector<NodeBuffer> wbuf;  // per worker: one dequantized bf16 panel (quantized layers, many tokens)
  // Per worker: timestamps at phase boundaries (see run_job).
  std::vector<std::array<int64_t, 8>> marks;

  std::atomic<uint64_t> invalid{0};
  std::atomic<int64_t> end_ns{0};
  int64_t start_ns = 0;

  // Generic parallel_for payload (packing, random fill).
  void (*pf_fn)(void*, size_t, size_t, const WorkerInfo&) = nullptr;
  void* pf_ctx = nullptr;
  size_t pf_n = 0;
  bool is_pf = false;
};

Engine::Engine(EngineConfig cfg) : cfg_(std::move(cfg)) {
  if (cfg_.groups.empty()) throw std::invalid_argument("engine needs at least one node group");
  for (auto& g : cfg_.groups)
    if (g.cpus.empty()) throw std::invalid_argument("every node group needs at least one worker");
  pool_ = std::make_unique<Pool>(cfg_.groups, cfg_.spin_us);
  job_ = std::make_unique<Job>();
  job_->groups = std::vector<Job::Group>(pool_->num_groups());
  job_->ybuf.resize(pool_->total());
  job_->wbuf.resize(pool_->total());
  job_->marks.resize(pool_->total());
}

Engine::~Engine() {
  if (pool_ && !pool_->done()) pool_->wait();
}

EngineStats Engine::stats() const {
  EngineStats s;
  s.calls = calls_.load();
  s.tokens = tokens_.load();
  s.assignments = assignments_.load();
  s.invalid_ids = invalid_.load();
  s.busy_ns = busy_ns_.load();
  s.route_ns = ph_[0]; s.gather_ns = ph_[1]; s.gateup_ns = ph_[2]; s.down_ns = ph_[3]; s.reduce_ns = ph_[4];
  s.gateup_work_max_ns = ph_[5]; s.gateup_work_mean_ns = ph_[6]; s.down_work_max_ns = ph_[7]; s.down_work_mean_ns = ph_[8];
  s.wake_first_ns = ph_[9]; s.wake_last_ns = ph_[10];
  return s;
}

void Engine::reset_stats() {
  calls_ = 0;
  tokens_ = 0;
  assignments_ = 0;
  invalid_ = 0;
  busy_ns_ = 0;
  for (auto& p : ph_) p = 0;
}

namespace {
int worker_node(const Pool& P, int w) {
  for (int g = 0; g < P.num_groups(); ++g)
    if (w >= P.group_first(g) && w < P.group_first(g) + P.group_size(g)) return P.group_numa_node(g);
  return -1;
}

size_t wbuf_bytes(const MoELayer& L) {
  size_t K = L.Hp();
  for (const Slice& s : L.slices()) K = std::max<size_t>(K, s.inp);
  return panel_elems(K) * 2;
}

bool fits(const Engine::Job& j, const MoELayer& L, int M, int k) {
  const size_t A = size_t(M) * k;
  if (j.row_token.size() < A || j.slot_row.size() < A || j.count.size() < size_t(L.E())) return false;
  if (j.xg.size() < (A + SLACK_ROWS) * act_ld(L.Hp()) * j.act) return false;
  if (L.int8_activations() && j.xq.size() < A * act_ld(L.Hp()) * j.act) return false;
  for (size_t g = 0; g < j.groups.size(); ++g) {
    if (j.groups[g].y.size() < std::max<size_t>(A, 1) * y_ld(L.Hp()) * 4) return false;
    if (j.groups[g].hbuf.size() < (A + SLACK_ROWS) * act_ld(L.slices()[g].inp) * j.act) return false;
  }
  if (L.quantized() && j.wbuf[0].size() < wbuf_bytes(L)) return false;
  return !j.ybuf.empty() && j.ybuf[0].size() > 0;
}
}  // namespace

void Engine::reserve(int tokens, int k, const MoELayer& layer) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  if (!pool_->done()) pool_->wait();
  Job& j = *job_;
  const size_t A = size_t(std::max(tokens, 1)) * std::max(k, 1);
  const size_t act = dtype_size(layer.ks_->act);
  // Growing keeps some headroom so a slowly rising batch size does not reallocate every call.
  auto grow = [](NodeBuffer& b, size_t bytes, int node) {
    if (bytes > b.size()) b.reset(bytes + bytes / 4, node);
  };
  grow(j.xg, (A + SLACK_ROWS) * act_ld(layer.Hp_) * act, pool_->group_numa_node(0));
  if (layer.int8_activations()) grow(j.xq, A * act_ld(layer.Hp_) * act, pool_->group_numa_node(0));
  for (int g = 0; g < pool_->num_groups(); ++g) {
    const int node = pool_->group_numa_node(g);
    grow(j.groups[g].hbuf, (A + SLACK_ROWS) * act_ld(layer.slices_[g].inp) * act, node);
    grow(j.groups[g].y, A * y_ld(layer.Hp_) * 4, node);
  }
  for (int w = 0; w < pool_->total(); ++w) {
    if (j.ybuf[w].size() == 0) j.ybuf[w].reset((CHUNK + SLACK_ROWS) * 32 * 4, worker_node(*pool_, w));
    if (layer.quantized()) grow(j.wbuf[w], wbuf_bytes(layer), worker_node(*pool_, w));
  }
  if (j.count.size() < size_t(layer.E_)) {
    j.count.resize(layer.E_);
    j.offset.resize(layer.E_ + 1);
  }
  if (j.row_token.size() < A) {
    j.row_token.resize(A);
    j.row_weight.resize(A);
    j.slot_row.resize(A);
  }
}

// ---------------------------------------------------------------------------
// Phases of a forward call (see engine.h for the math).

namespace {

using Job = Engine::Job;

inline int expert_id(const ForwardArgs& a, size_t i) {
  return a.ids_int64 ? int(std::max<int64_t>(std::min<int64_t>(static_cast<const int64_t*>(a.topk_ids)[i], 1 << 30), -1))
                     : static_cast<const int32_t*>(a.topk_ids)[i];
}

void route(Job& j) {
  const int E = j.layer->E();
  const size_t n = size_t(j.a.M) * j.a.k;
  std::fill(j.count.begin(), j.count.begin() + E, 0);
  uint64_t invalid = 0;
  for (size_t i = 0; i < n; ++i) {
    const int e = expert_id(j.a, i);
    if (e < 0 || e >= E)
      ++invalid;
    else
      ++j.count[e];
  }
  j.active.clear();
  j.offset[0] = 0;
  for (int e = 0; e < E; ++e) {
    j.offset[e + 1] = j.offset[e] + j.count[e];
    if (j.count[e]) j.active.push_back(e);
  }
  j.A = j.offset[E];
  // Stable placement: tokens of an expert keep their order.
  std::vector<int>& cursor = j.count;  // reused, re-derived from offsets below
  for (int e = 0; e < E; ++e) cursor[e] = j.offset[e];
  for (size_t i = 0; i < n; ++i) {
    const int e = expert_id(j.a, i);
    if (e < 0 || e >= E) {
      j.slot_row[i] = -1;
      continue;
    }
    const int pos = cursor[e]++;
    j.row_token[pos] = int(i / j.a.k);
    j.row_weight[pos] = j.a.topk_weights[i];
    j.slot_row[i] = pos;
  }
  for (int e = 0; e < E; ++e) j.count[e] = j.offset[e + 1] - j.offset[e];
  for (auto& g : j.groups) {
    g.gate_up.next.store(0, std::memory_order_relaxed);
    g.down.next.store(0, std::memory_order_relaxed);
  }
  j.invalid.store(invalid);
}

void gather(Job& j, const WorkerInfo& w, int total) {
  const size_t Hp = j.layer->Hp(), ld = act_ld(Hp);
  char* xg = j.xg.as<char>();
  const size_t b = size_t(j.A) * w.gid / total, e = size_t(j.A) * (w.gid + 1) / total;
  for (size_t pos = b; pos < e; ++pos) {
    const char* src = static_cast<const char*>(j.a.x) + size_t(j.row_token[pos]) * j.a.ldx * dtype_size(j.a.x_type);
    char* row = xg + pos * ld * j.act;
    convert_row(src, j.a.x_type, j.layer->H(), row, j.ks->act, ld);
    if (j.layer->int8_activations()) j.ks->quantize_q8(row, int(Hp), j.xq.as<uint8_t>() + pos * ld * j.act);
  }
}

// Quantized panels: few tokens widen the weights in registers; from this many
// on, the panel is dequantized once to bf16 and the bf16 kernels (AMX) run.
constexpr int DEQUANT_ROWS = 32;

// Whether an expert with n rows runs on q8 rows (both projections decide alike,
// so gate_up writes h in the format down reads).
inline bool on_int8(const Job& j, int n) { return j.layer->int8_activations() && n < DEQUANT_ROWS; }

// y = rows of x (n of them, CHUNK at a time) times one panel; `each` gets
// every chunk's result.  x holds q8 rows when on_int8(n).
template <class Each>
void panel_rows(const Job& j, const WorkerInfo& w, const char* x, size_t ldx, int n, const char* panel, int K, float* y,
                Each each) {
  const MoELayer& L = *j.layer;
  if (on_int8(j, n)) {
    j.ks->q4_dot_q8(reinterpret_cast<const uint8_t*>(x), ldx * j.act, n, reinterpret_cast<const uint8_t*>(panel), K,
                    L.group_for(K), y);
    each(0, n);
    return;
  }
  const void* p = panel;
  if (L.quantized() && n >= DEQUANT_ROWS) {
    uint16_t* wb = j.wbuf[w.gid].as<uint16_t>();
    (j.ks->dequant ? j.ks->dequant : dequant_panel_bf16)(L.format().kind, reinterpret_cast<const uint8_t*>(panel), K,
                                                        L.group_for(K), wb);
    p = wb;
  }
  for (int c0 = 0; c0 < n; c0 += CHUNK) {
    const int nc = std::min(CHUNK, n - c0);
    const char* xc = x + size_t(c0) * ldx * j.act;
    if (p != panel || !L.quantized())
      j.ks->panel_dot(xc, ldx, nc, p, K, y);
    else if (L.format().kind == WKind::int4)
      j.ks->q4_dot(xc, ldx, nc, reinterpret_cast<const uint8_t*>(panel), K, L.group_for(K), y);
    else
      j.ks->f8_dot(xc, ldx, nc, reinterpret_cast<const uint8_t*>(panel), K, L.group_for(K), y);
    each(c0, nc);
  }
}

// Item i of a phase is (expert active[i / per], panel i % per): consecutive
// items stream consecutive panels of one expert.
void gate_up(Job& j, const WorkerInfo& w, int T) {
  const MoELayer& L = *j.layer;
  const Slice& S = L.slices()[w.group];
  const int Hp = L.Hp();
  const int npan = S.inp / 16;  // each w13 panel: 16 gate + 16 up rows
  const size_t pbytes = L.panel_bytes(Hp), ldx = act_ld(Hp), ldh = act_ld(S.inp);
  const char* w13 = S.w13.as<char>();
  const char* xg = j.xg.as<char>();
  const char* xq = j.xq.as<char>();
  char* hbuf = j.groups[w.group].hbuf.as<char>();
  float* y = j.ybuf[w.gid].as<float>();
  const int64_t items = int64_t(j.active.size()) * npan;
  int64_t b, e;
  while (grab(j.groups[w.group].gate_up, items, T, &b, &e)) {
    for (int64_t it = b; it < e; ++it) {
      const int ex = j.active[it / npan], r = int(it % npan);
      const int off = j.offset[ex], n = j.count[ex];
      const bool q8 = on_int8(j, n);
      panel_rows(j, w, (q8 ? xq : xg) + size_t(off) * ldx * j.act, ldx, n, w13 + (size_t(ex) * npan + r) * pbytes, Hp, y,
                 [&](int c0, int nc) {
                   if (q8)
                     j.ks->silu_mul_q8(y, nc, reinterpret_cast<uint8_t*>(hbuf + size_t(off + c0) * ldh * j.act),
                                       ldh * j.act, S.inp, r);
                   else
                     j.ks->silu_mul(y, nc, hbuf + (size_t(off + c0) * ldh + size_t(r) * 16) * j.act, ldh);
                 });
    }
  }
}

void down(Job& j, const WorkerInfo& w, int T) {
  const MoELayer& L = *j.layer;
  const Slice& S = L.slices()[w.group];
  const int Hp = L.Hp();
  const int npb = Hp / 32;
  const size_t pbytes = L.panel_bytes(S.inp), ldh = act_ld(S.inp), ldy = y_ld(Hp);
  const char* w2 = S.w2.as<char>();
  const char* hbuf = j.groups[w.group].hbuf.as<char>();
  float* out = j.groups[w.group].y.as<float>();
  float* y = j.ybuf[w.gid].as<float>();
  const int64_t items = int64_t(j.active.size()) * npb;
  int64_t b, e;
  while (grab(j.groups[w.group].down, items, T, &b, &e)) {
    for (int64_t it = b; it < e; ++it) {
      const int ex = j.active[it / npb], blk = int(it % npb);
      const int off = j.offset[ex];
      panel_rows(j, w, hbuf + size_t(off) * ldh * j.act, ldh, j.count[ex], w2 + (size_t(ex) * npb + blk) * pbytes, S.inp, y,
                 [&](int c0, int nc) {
                   for (int i = 0; i < nc; ++i) {
                     const int row = off + c0 + i;
                     const float wt = j.row_weight[row];
                     float* dst = out + size_t(row) * ldy + size_t(blk) * 32;
                     const float* yi = y + size_t(i) * 32;
                     for (int q = 0; q < 32; ++q) dst[q] = wt * yi[q];
                   }
                 });
    }
  }
}

void reduce(Job& j, const WorkerInfo& w, Pool& P) {
  const MoELayer& L = *j.layer;
  const int Hp = L.Hp(), H = L.H();
  const int npb = Hp / 32;
  const int M = j.a.M, k = j.a.k;
  const int total = P.total(), G = P.num_groups();
  const size_t ldy = y_ld(Hp), os = dtype_size(j.a.out_type);
  const size_t items = size_t(M) * npb;
  const size_t b0 = items * w.gid / total, b1 = items * (w.gid + 1) / total;
  float v[32];
  for (size_t it = b0; it < b1; ++it) {
    const int m = int(it / npb), blk = int(it % npb);
    std::fill(v, v + 32, 0.0f);
    for (int s = 0; s < k; ++s) {
      const int row = j.slot_row[size_t(m) * k + s];
      if (row < 0) continue;
      for (int g = 0; g < G; ++g) {
        const float* src = j.groups[g].y.as<float>() + size_t(row) * ldy + size_t(blk) * 32;
        for (int q = 0; q < 32; ++q) v[q] += src[q];
      }
    }
    char* dst = static_cast<char*>(j.a.out) + (size_t(m) * j.a.ldo + size_t(blk) * 32) * os;
    const int cols = std::min(32, H - blk * 32);
    if (j.a.out_type == DType::f32) {
      std::memcpy(dst, v, cols * 4);
    } else {
      for (int q = 0; q < cols; ++q) store_from_f32(dst, q, j.a.out_type, v[q]);
    }
  }
}

}  // namespace

void Engine::run_job(void* ctx, const WorkerInfo& w) {
  Engine* eng = static_cast<Engine*>(ctx);
  Job& j = *eng->job_;
  Pool& P = *eng->pool_;
  if (j.is_pf) {
    size_t b = j.pf_n * w.gid / P.total(), e = j.pf_n * (w.gid + 1) / P.total();
    if (b < e) j.pf_fn(j.pf_ctx, b, e, w);
    return;
  }
  auto& mk = j.marks[w.gid];
  mk[0] = now_ns();
  if (w.gid == 0) route(j);
  P.barrier_all(w);
  mk[1] = now_ns();
  gather(j, w, P.total());
  P.barrier_all(w);
  mk[2] = now_ns();
  gate_up(j, w, P.group_size(w.group));
  mk[3] = now_ns();
  P.barrier_group(w);
  mk[4] = now_ns();
  down(j, w, P.group_size(w.group));
  mk[5] = now_ns();
  P.barrier_all(w);
  mk[6] = now_ns();
  reduce(j, w, P);
  mk[7] = now_ns();
  int64_t t = mk[7], prev = j.end_ns.load();
  while (t > prev && !j.end_ns.compare_exchange_weak(prev, t)) {
  }
}

bool Engine::fits_without_growing(const MoELayer& layer, int M, int k) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  return fits(*job_, layer, M, k);
}

void Engine::submit(MoELayer* layer, const ForwardArgs& args, uint32_t* done_flag) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  // Also when the pool is done: a job nobody waited for (its completion went
  // to a done flag) still has its figures to account.
  wait();
  Job& j = *job_;
  j.is_pf = false;
  j.layer = layer;
  j.a = args;
  j.ks = layer->ks_;
  j.act = dtype_size(j.ks->act);
  // Grow scratch if this call is larger than any before (reserve() avoids it).
  if (!fits(j, *layer, args.M, args.k)) {
    submit_mu_.unlock();
    reserve(std::max(args.M, 1), args.k, *layer);
    submit_mu_.lock();
  }
  j.start_ns = now_ns();
  j.end_ns.store(j.start_ns);
  calls_.fetch_add(1, std::memory_order_relaxed);
  tokens_.fetch_add(args.M, std::memory_order_relaxed);
  pool_->submit(&Engine::run_job, this, done_flag);
}

void Engine::wait() {
  pool_->wait();
  Job& j = *job_;
  if (!j.is_pf && j.layer) {
    last_end_ns_.store(j.end_ns.load(), std::memory_order_relaxed);
    busy_ns_.fetch_add(uint64_t(j.end_ns.load() - j.start_ns), std::memory_order_relaxed);
    assignments_.fetch_add(uint64_t(j.A), std::memory_order_relaxed);
    invalid_.fetch_add(j.invalid.exchange(0), std::memory_order_relaxed);
    const auto& m0 = j.marks[0];
    ph_[0] += m0[1] - m0[0];
    ph_[1] += m0[2] - m0[1];
    ph_[2] += m0[4] - m0[2];
    ph_[3] += m0[6] - m0[4];
    ph_[4] += m0[7] - m0[6];
    int64_t p1max = 0, p1sum = 0, p2max = 0, p2sum = 0, first = INT64_MAX, last = 0;
    for (const auto& m : j.marks) {
      first = std::min(first, m[0]);
      last = std::max(last, m[0]);
      p1max = std::max(p1max, m[3] - m[2]);
      p1sum += m[3] - m[2];
      p2max = std::max(p2max, m[5] - m[4]);
      p2sum += m[5] - m[4];
    }
    const int64_t n = int64_t(j.marks.size());
    ph_[5] += p1max;
    ph_[6] += p1sum / n;
    ph_[7] += p2max;
    ph_[8] += p2sum / n;
    ph_[9] += first - j.start_ns;
    ph_[10] += last - j.start_ns;
    j.layer = nullptr;
  }
}

void Engine::parallel_for(size_t n, void (*fn)(void*, size_t, size_t, const WorkerInfo&), void* ctx) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  if (!pool_->done()) wait();
  Job& j = *job_;
  j.is_pf = true;
  j.pf_fn = fn;
  j.pf_ctx = ctx;
  j.pf_n = n;
  pool_->submit(&Engine::run_job, this);
  pool_->wait();
  j.is_pf = false;
}

// ---------------------------------------------------------------------------
// Layer: weights and packing.

MoELayer::MoELayer(std::shared_ptr<Engine> engine, int E, int H, int I, WeightFormat wf)
    : engine_(std::move(engine)), E_(E), H_(H), I_(I), wf_(wf) {
  if (E <= 0 || H <= 0 || I <= 0) throw std::invalid_argument("experts, hidden and intermediate sizes must be positive");
  if (wf.group < 0 || wf.group % 32 != 0)
    throw std::invalid_argument("quantization group size must be a positive multiple of 32, or 0 for one scale per row");
  if (!is_quantized(wf.kind) && wf.group != 0) throw std::invalid_argument("bfloat16/float16 weights take no group size");
  ks_ = choose_kernels(wf.kind == WKind::f16 ? DType::f16 : DType::bf16, engine_->config().isa_cap);
  if (!ks_) throw std::runtime_error("no kernel for these weights on this CPU");
  int8_act_ = wf.kind == WKind::int4 && wf.int8_activations && ks_->q4_dot_q8;
  // K is padded to whole groups (zero weights), so groups never straddle a panel or a node slice.
  const size_t kalign = wf.group > 0 ? size_t(wf.group) : size_t(K_ALIGN);
  Hp_ = int(round_up(H, kalign));
  const int groups = engine_->num_groups();
  int per = int(round_up((I + groups - 1) / groups, kalign));
  int i0 = 0;
  for (int g = 0; g < groups; ++g) {
    Slice s;
    s.i0 = std::min(i0, I);
    s.in = std::max(0, std::min(per, I - s.i0));
    s.inp = int(round_up(std::max(s.in, 1), kalign));
    int node = engine_->pool().group_numa_node(g);
    s.w13.reset(size_t(E) * (s.inp / 16) * panel_bytes(Hp_), node);
    s.w2.reset(size_t(E) * (Hp_ / 32) * panel_bytes(s.inp), node);
    slices_.push_back(std::move(s));
    i0 += per;
  }
  loaded_.assign(E, 0);
}

size_t MoELayer::panel_bytes(int K) const {
  return is_quantized(wf_.kind) ? qpanel_bytes(wf_.kind, K, group_for(K)) : panel_elems(K) * 2;
}

size_t MoELayer::expert_bytes() const {
  size_t b = 0;
  for (const Slice& s : slices_) b += (s.inp / 16) * panel_bytes(Hp_) + (Hp_ / 32) * panel_bytes(s.inp);
  return b;
}

size_t MoELayer::packed_bytes() const {
  size_t b = 0;
  for (const Slice& s : slices_) b += s.w13.size() + s.w2.size();
  return b;
}

bool MoELayer::complete() const {
  for (uint8_t m : loaded_)
    if (m != 7) return false;
  return true;
}

namespace {

struct PackCtx {
  MoELayer* layer;
  int e;
  Part part;
  const void* src;
  DType st;
  size_t ld;
};

inline uint16_t to_w(const void* src, size_t i, DType st, DType wt) {
  if (st == wt) return static_cast<const uint16_t*>(src)[i];
  float f = load_as_f32(src, i, st);
  return wt == DType::bf16 ? f32_to_bf16(f) : f32_to_f16(f);
}

// One source row of gate/up ([H] for intermediate row i) into its slice.
void pack_gateup_row(MoELayer& L, int e, bool up, int i, const void* row, DType st) {
  const int Hp = L.Hp(), H = L.H();
  for (const Slice& s : L.slices()) {
    if (i < s.i0 || i >= s.i0 + s.in) continue;
    const int li = i - s.i0, npan = s.inp / 16;
    uint16_t* panel = reinterpret_cast<uint16_t*>(s.w13.as<char>() + (size_t(e) * npan + li / 16) * L.panel_bytes(Hp));
    const int c = (li % 16) + (up ? 16 : 0);
    for (int k = 0; k < H; ++k) panel[panel_offset(c, k)] = to_w(row, k, st, L.weight_type());
  }
}

// One source row of down ([I] for hidden row h) split over the slices.
void pack_down_row(MoELayer& L, int e, int h, const void* row, DType st) {
  const int npb = L.Hp() / 32;
  for (const Slice& s : L.slices()) {
    if (s.in == 0) continue;
    uint16_t* panel = reinterpret_cast<uint16_t*>(s.w2.as<char>() + (size_t(e) * npb + h / 32) * L.panel_bytes(s.inp));
    const int c = h % 32;
    for (int li = 0; li < s.in; ++li) panel[panel_offset(c, li)] = to_w(row, s.i0 + li, st, L.weight_type());
  }
}

void pack_rows(void* vctx, size_t b, size_t e, const WorkerInfo&) {
  PackCtx& c = *static_cast<PackCtx*>(vctx);
  MoELayer& L = *c.layer;
  const size_t es = dtype_size(c.st);
  for (size_t r = b; r < e; ++r) {
    const void* row = static_cast<const char*>(c.src) + r * c.ld * es;
    switch (c.part) {
      case Part::gate: pack_gateup_row(L, c.e, false, int(r), row, c.st); break;
      case Part::up: pack_gateup_row(L, c.e, true, int(r), row, c.st); break;
      case Part::gate_up: pack_gateup_row(L, c.e, r >= size_t(L.I()), int(r % L.I()), row, c.st); break;
      case Part::down: pack_down_row(L, c.e, int(r), row, c.st); break;
    }
  }
}

// --- quantized parts (quant.h layout) ---------------------------------------

// Output row c of a quantized panel over K: q[k0 .. k0+n) and the scales of
// its groups (source group g0 onwards).  Columns past n stay zero.
void put_qrow(const MoELayer& L, char* panel, int K, int c, const uint8_t* q, size_t k0, size_t n, const float* scales,
              size_t g0) {
  uint8_t* data = reinterpret_cast<uint8_t*>(panel);
  if (L.format().kind == WKind::int4) {
    for (size_t k = 0; k < n; ++k) {
      uint8_t& b = data[q4_offset(c, k)];
      const int s = q4_shift(k);
      b = uint8_t((b & ~(15 << s)) | (q[k0 + k] & 15) << s);
    }
  } else {
    for (size_t k = 0; k < n; ++k) data[panel_offset(c, k)] = q[k0 + k];
  }
  const size_t G = size_t(L.group_for(K));
  uint16_t* sc = reinterpret_cast<uint16_t*>(panel + qpanel_data_bytes(L.format().kind, K));
  for (size_t g = 0; g * G < n; ++g) sc[g * 32 + size_t(c)] = f32_to_f16(scales[g0 + g]);
}

void qpack_gateup_row(MoELayer& L, int e, bool up, int i, const uint8_t* q, const float* scales) {
  const int Hp = L.Hp();
  for (const Slice& s : L.slices()) {
    if (i < s.i0 || i >= s.i0 + s.in) continue;
    const int li = i - s.i0, npan = s.inp / 16;
    char* panel = s.w13.as<char>() + (size_t(e) * npan + li / 16) * L.panel_bytes(Hp);
    put_qrow(L, panel, Hp, (li % 16) + (up ? 16 : 0), q, 0, L.H(), scales, 0);
  }
}

void qpack_down_row(MoELayer& L, int e, int h, const uint8_t* q, const float* scales) {
  const int npb = L.Hp() / 32;
  // Source groups run along the whole I; a slice starts on a group boundary.
  const size_t Gsrc = L.format().group > 0 ? size_t(L.format().group) : size_t(L.I());
  for (const Slice& s : L.slices()) {
    if (s.in == 0) continue;
    char* panel = s.w2.as<char>() + (size_t(e) * npb + h / 32) * L.panel_bytes(s.inp);
    put_qrow(L, panel, s.inp, h % 32, q, s.i0, s.in, scales, s.i0 / Gsrc);
  }
}

size_t source_groups(const MoELayer& L, size_t cols) {
  return L.format().group > 0 ? (cols + L.format().group - 1) / L.format().group : 1;
}

struct QPackCtx {
  MoELayer* layer;
  int e;
  Part part;
  const uint8_t* q;
  size_t ldq;
  const float* scales;
  size_t lds;
};

void qpack_rows(void* vctx, size_t b, size_t e, const WorkerInfo&) {
  QPackCtx& c = *static_cast<QPackCtx*>(vctx);
  MoELayer& L = *c.layer;
  for (size_t r = b; r < e; ++r) {
    const uint8_t* q = c.q + r * c.ldq;
    const float* sc = c.scales + r * c.lds;
    switch (c.part) {
      case Part::gate: qpack_gateup_row(L, c.e, false, int(r), q, sc); break;
      case Part::up: qpack_gateup_row(L, c.e, true, int(r), q, sc); break;
      case Part::gate_up: qpack_gateup_row(L, c.e, r >= size_t(L.I()), int(r % L.I()), q, sc); break;
      case Part::down: qpack_down_row(L, c.e, int(r), q, sc); break;
    }
  }
}

struct FillCtx {
  MoELayer* layer;
  uint64_t seed;
  float scale;
  std::vector<std::pair<int, int>> todo;  // (expert, part)
};

void fill_items(void* vctx, size_t b, size_t e, const WorkerInfo&) {
  FillCtx& c = *static_cast<FillCtx*>(vctx);
  MoELayer& L = *c.layer;
  std::vector<float> row(std::max(L.H(), L.I()));
  std::vector<uint8_t> qrow(row.size());
  std::vector<float> srow(row.size());
  for (size_t it = b; it < e; ++it) {
    const int ex = c.todo[it].first, part = c.todo[it].second;
    const int rows = part == 2 ? L.H() : L.I();
    const int cols = part == 2 ? L.I() : L.H();
    for (int r = 0; r < rows; ++r) {
      uint64_t s = c.seed ^ (uint64_t(ex) << 40) ^ (uint64_t(part) << 32) ^ uint64_t(r) * 0x100000001b3ull;
      if (L.quantized()) {
        // Codes spread over the whole range; scales so that |w| <= scale.
        const bool fp8 = L.format().kind == WKind::fp8;
        for (int q = 0; q < cols; ++q) {
          const uint64_t z = splitmix64(s);
          qrow[q] = fp8 ? uint8_t((z & 0x80) | (z >> 8) % 0x7f) : uint8_t(z & 15);  // fp8: any but NaN; int4: any code
        }
        const float unit = fp8 ? c.scale / 448.0f : c.scale / 7.0f;
        for (size_t g = 0; g < source_groups(L, cols); ++g) srow[g] = unit;
        if (part == 2)
          qpack_down_row(L, ex, r, qrow.data(), srow.data());
        else
          qpack_gateup_row(L, ex, part == 1, r, qrow.data(), srow.data());
        continue;
      }
      for (int q = 0; q < cols; ++q) {
        double u = double(splitmix64(s) >> 11) * (1.0 / 9007199254740992.0);
        row[q] = float((2.0 * u - 1.0) * c.scale);
      }
      if (part == 2)
        pack_down_row(L, ex, r, row.data(), DType::f32);
      else
        pack_gateup_row(L, ex, part == 1, r, row.data(), DType::f32);
    }
  }
}

}  // namespace

void MoELayer::load(int e, Part part, const void* src, DType st, size_t ld) {
  if (e < 0 || e >= E_) throw std::invalid_argument("expert id " + std::to_string(e) + " out of range [0, " + std::to_string(E_) + ")");
  if (quantized())
    throw std::invalid_argument(std::string("this layer holds ") + wkind_name(wf_.kind) + " weights: use load_quantized");
  size_t rows = part == Part::down ? H_ : part == Part::gate_up ? 2 * size_t(I_) : I_;
  size_t cols = part == Part::down ? I_ : H_;
  if (ld < cols) throw std::invalid_argument("row stride smaller than the row");
  PackCtx ctx{this, e, part, src, st, ld};
  engine_->parallel_for(rows, &pack_rows, &ctx);
  loaded_[e] |= part == Part::gate ? 1 : part == Part::up ? 2 : part == Part::down ? 4 : 3;
}

void MoELayer::load_quantized(int e, Part part, const void* q, size_t ldq, const float* scales, size_t lds) {
  if (e < 0 || e >= E_) throw std::invalid_argument("expert id " + std::to_string(e) + " out of range [0, " + std::to_string(E_) + ")");
  if (!quantized()) throw std::invalid_argument("this layer holds bfloat16/float16 weights: use load");
  size_t rows = part == Part::down ? H_ : part == Part::gate_up ? 2 * size_t(I_) : I_;
  size_t cols = part == Part::down ? I_ : H_;
  if (ldq < cols) throw std::invalid_argument("row stride of the codes smaller than the row");
  if (lds < source_groups(*this, cols)) throw std::invalid_argument("row stride of the scales smaller than the groups");
  QPackCtx ctx{this, e, part, static_cast<const uint8_t*>(q), ldq, scales, lds};
  engine_->parallel_for(rows, &qpack_rows, &ctx);
  loaded_[e] |= part == Part::gate ? 1 : part == Part::up ? 2 : part == Part::down ? 4 : 3;
}

void MoELayer::fill_random(uint64_t seed, float scale) {
  FillCtx ctx{this, seed, scale, {}};
  for (int e = 0; e < E_; ++e)
    for (int p = 0; p < 3; ++p)
      if (!(loaded_[e] & (1 << p))) ctx.todo.emplace_back(e, p);
  engine_->parallel_for(ctx.todo.size(), &fill_items, &ctx);
  for (auto& t : ctx.todo) loaded_[t.first] |= uint8_t(1 << t.second);
}

void MoELayer::forward(const ForwardArgs& a) {
  const size_t n = size_t(a.M) * a.k;
  for (size_t i = 0; i < n; ++i) {
    int64_t e = a.ids_int64 ? static_cast<const int64_t*>(a.topk_ids)[i] : static_cast<const int32_t*>(a.topk_ids)[i];
    if (e < 0 || e >= E_)
      throw std::invalid_argument("topk_ids[" + std::to_string(i / a.k) + ", " + std::to_string(i % a.k) + "] = " +
                                  std::to_string(e) + " is not an expert id in [0, " + std::to_string(E_) + ")");
  }
  engine_->submit(this, a);
  engine_->wait();
}

}  // namespace lk
