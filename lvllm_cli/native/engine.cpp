#include "engine.h"

#include <algorithm>
#include <array>
#include <chrono>
#include <stdexcept>

namespace lk {

namespace {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Rows handed to one panel_dot call: bounds the per-worker y scratch (32 KB)
// and keeps it in L1/L2; a multiple of 32 so AMX tiles stay full.
constexpr int CHUNK = 256;

// Relative cost of one panel item: streaming its weights counts like this
// many tokens of compute.  Used to give every worker equal work.
constexpr int64_t PANEL_COST = 16;

// Row strides of the scratch matrices, padded by a cache line: rows exactly
// 4 KiB apart all land in one L1 set, and a 16-row AMX tile load (or eight
// broadcast rows) then misses L1 on every row.
inline size_t act_ld(size_t K) { return K + 32; }
inline size_t partial_ld(size_t Hp) { return Hp + 16; }

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

}  // namespace

// ---------------------------------------------------------------------------
// The job: one forward call in flight, with the scratch it reuses.

struct Engine::Job {
  MoELayer* layer = nullptr;
  ForwardArgs a;
  const KernelSet* ks = nullptr;
  size_t act = 2;  // bytes per activation element

  // Routing: assignments sorted by expert.
  std::vector<int> count, offset, active, row_token;
  std::vector<float> row_weight;
  int A = 0;

  NodeBuffer xg;  // [A, Hp] activations, expert-sorted
  struct Group {
    NodeBuffer hbuf;     // [A, inp] silu(gate) * up
    NodeBuffer partial;  // [M, Hp] fp32
  };
  std::vector<Group> groups;
  struct Worker {
    NodeBuffer y;      // [CHUNK, 32] fp32
    NodeBuffer fixup;  // [M, 32] fp32, partial block shared with the previous worker
    int fixup_block = -1;
  };
  std::vector<Worker> workers;
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
  job_->groups.resize(pool_->num_groups());
  job_->workers.resize(pool_->total());
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

void Engine::reserve(int tokens, int k, const MoELayer& layer) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  if (!pool_->done()) pool_->wait();
  Job& j = *job_;
  size_t A = size_t(tokens) * k;
  size_t act = dtype_size(layer.ks_->act);
  j.xg.ensure(A * act_ld(layer.Hp_) * act, pool_->group_numa_node(0));
  for (int g = 0; g < pool_->num_groups(); ++g) {
    int node = pool_->group_numa_node(g);
    j.groups[g].hbuf.ensure(A * act_ld(layer.slices_[g].inp) * act, node);
    j.groups[g].partial.ensure(size_t(tokens) * partial_ld(layer.Hp_) * 4, node);
  }
  for (int w = 0; w < pool_->total(); ++w) {
    int node = pool_->group_numa_node(pool_->groups().size() > 1 ? 0 : 0);
    for (int g = 0; g < pool_->num_groups(); ++g)
      if (w >= pool_->group_first(g) && w < pool_->group_first(g) + pool_->group_size(g)) node = pool_->group_numa_node(g);
    j.workers[w].y.ensure(size_t(CHUNK) * 32 * 4, node);
    j.workers[w].fixup.ensure(size_t(tokens) * 32 * 4, node);
  }
  if (j.count.size() < size_t(layer.E_)) {
    j.count.resize(layer.E_);
    j.offset.resize(layer.E_ + 1);
    j.active.resize(layer.E_);
  }
  if (j.row_token.size() < A) {
    j.row_token.resize(A);
    j.row_weight.resize(A);
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
    int e = expert_id(j.a, i);
    if (e < 0 || e >= E) {
      ++invalid;
      continue;
    }
    ++j.count[e];
  }
  int nact = 0;
  j.offset[0] = 0;
  for (int e = 0; e < E; ++e) {
    j.offset[e + 1] = j.offset[e] + j.count[e];
    if (j.count[e]) j.active[nact++] = e;
  }
  j.active.resize(std::max<size_t>(j.active.size(), 0));
  j.A = j.offset[E];
  // Stable placement: tokens of an expert keep their order.
  std::vector<int>& cursor = j.count;  // reused; counts are re-derived from offsets below
  for (int e = 0; e < E; ++e) cursor[e] = j.offset[e];
  for (size_t i = 0; i < n; ++i) {
    int e = expert_id(j.a, i);
    if (e < 0 || e >= E) continue;
    int pos = cursor[e]++;
    j.row_token[pos] = int(i / j.a.k);
    j.row_weight[pos] = j.a.topk_weights[i];
  }
  for (int e = 0; e < E; ++e) j.count[e] = j.offset[e + 1] - j.offset[e];
  j.active.erase(j.active.begin() + nact, j.active.end());
  j.invalid.store(invalid);
}

void gather(Job& j, const WorkerInfo& w, int total) {
  const size_t Hp = j.layer->Hp();
  size_t b = size_t(j.A) * w.gid / total, e = size_t(j.A) * (w.gid + 1) / total;
  char* xg = j.xg.as<char>();
  for (size_t pos = b; pos < e; ++pos) {
    const char* src = static_cast<const char*>(j.a.x) + size_t(j.row_token[pos]) * j.a.ldx * dtype_size(j.a.x_type);
    convert_row(src, j.a.x_type, j.layer->H(), xg + pos * act_ld(Hp) * j.act, j.ks->act, Hp);
  }
}

// Items are laid out in a fixed order with a cost each; worker l of T takes
// the items whose starting cost c satisfies l*total <= c*T < (l+1)*total.
struct Share {
  int64_t lo, hi, T;  // bounds scaled by T
  bool owns(int64_t start) const { return start * T >= lo && start * T < hi; }
};

void phase1(Job& j, const WorkerInfo& w, int T) {
  const MoELayer& L = *j.layer;
  const Slice& S = L.slices()[w.group];
  const int Hp = L.Hp();
  const int npan = S.inp / 16;  // each w13 panel: 16 gate + 16 up rows
  const size_t pel = panel_elems(Hp);
  const char* w13 = S.w13.as<char>();
  const char* xg = j.xg.as<char>();
  char* hbuf = j.groups[w.group].hbuf.as<char>();
  float* y = j.workers[w.gid].y.as<float>();

  int64_t total = 0;
  for (int e : j.active) total += int64_t(npan) * (PANEL_COST + j.count[e]);
  Share sh{int64_t(w.lid) * total, int64_t(w.lid + 1) * total, T};
  int64_t cum = 0;
  for (int e : j.active) {
    const int64_t c = PANEL_COST + j.count[e];
    const int64_t span = int64_t(npan) * c;
    if ((cum + span) * T <= sh.lo) { cum += span; continue; }
    if (cum * T >= sh.hi) break;
    const int n = j.count[e], off = j.offset[e];
    for (int r = 0; r < npan; ++r) {
      if (!sh.owns(cum + r * c)) continue;
      const char* panel = w13 + ((size_t(e) * npan + r) * pel) * 2;
      for (int c0 = 0; c0 < n; c0 += CHUNK) {
        int nc = std::min(CHUNK, n - c0);
        j.ks->panel_dot(xg + size_t(off + c0) * act_ld(Hp) * j.act, act_ld(Hp), nc, panel, Hp, y);
        j.ks->silu_mul(y, nc, hbuf + (size_t(off + c0) * act_ld(S.inp) + size_t(r) * 16) * j.act, act_ld(S.inp));
      }
    }
    cum += span;
  }
}

void phase2(Job& j, const WorkerInfo& w, int T) {
  const MoELayer& L = *j.layer;
  const Slice& S = L.slices()[w.group];
  const int Hp = L.Hp();
  const int npb = Hp / 32;
  const size_t pel = panel_elems(S.inp);
  const char* w2 = S.w2.as<char>();
  const char* hbuf = j.groups[w.group].hbuf.as<char>();
  float* partial = j.groups[w.group].partial.as<float>();
  Job::Worker& me = j.workers[w.gid];
  float* y = me.y.as<float>();
  const int M = j.a.M;
  me.fixup_block = -1;

  int64_t Cb = 0;
  for (int e : j.active) Cb += PANEL_COST + j.count[e];
  const int64_t total = Cb * npb;
  Share sh{int64_t(w.lid) * total, int64_t(w.lid + 1) * total, T};
  if (Cb == 0) return;
  int b_first = int(std::max<int64_t>(0, sh.lo / (T * Cb) - 1));
  for (int b = b_first; b < npb; ++b) {
    const int64_t base = int64_t(b) * Cb;
    if ((base + Cb) * T <= sh.lo) continue;
    if (base * T >= sh.hi) break;
    float* acc = nullptr;
    size_t lda = 0;
    int64_t cum = base;
    for (size_t ai = 0; ai < j.active.size(); ++ai) {
      const int e = j.active[ai];
      const int64_t c = PANEL_COST + j.count[e];
      const int64_t start = cum;
      cum += c;
      if (!sh.owns(start)) continue;
      if (!acc) {
        // The worker holding expert 0 of this block owns its slot in
        // `partial`; a worker starting mid-block writes a fixup instead.
        if (ai == 0) {
          acc = partial + size_t(b) * 32;
          lda = partial_ld(Hp);
        } else {
          acc = me.fixup.as<float>();
          lda = 32;
          me.fixup_block = b;
        }
        for (int m = 0; m < M; ++m) std::memset(acc + size_t(m) * lda, 0, 32 * 4);
      }
      const int n = j.count[e], off = j.offset[e];
      const char* panel = w2 + ((size_t(e) * npb + b) * pel) * 2;
      for (int c0 = 0; c0 < n; c0 += CHUNK) {
        int nc = std::min(CHUNK, n - c0);
        j.ks->panel_dot(hbuf + size_t(off + c0) * act_ld(S.inp) * j.act, act_ld(S.inp), nc, panel, S.inp, y);
        for (int i = 0; i < nc; ++i) {
          float* dst = acc + size_t(j.row_token[off + c0 + i]) * lda;
          const float wt = j.row_weight[off + c0 + i];
          const float* yi = y + size_t(i) * 32;
          for (int q = 0; q < 32; ++q) dst[q] += wt * yi[q];
        }
      }
    }
  }
}

void reduce(Job& j, const WorkerInfo& w, Pool& P) {
  const MoELayer& L = *j.layer;
  const int Hp = L.Hp(), H = L.H();
  const int npb = Hp / 32;
  const int M = j.a.M;
  const int total = P.total();
  // Fixups of every worker, with the group (partial) they belong to.
  int fix_w[1024];
  int nfix = 0;
  for (int v = 0; v < total && nfix < 1024; ++v)
    if (j.workers[v].fixup_block >= 0) fix_w[nfix++] = v;

  const size_t items = size_t(M) * npb;
  size_t b0 = items * w.gid / total, b1 = items * (w.gid + 1) / total;
  const size_t os = dtype_size(j.a.out_type);
  const bool empty = j.active.empty();
  float v[32];
  for (size_t it = b0; it < b1; ++it) {
    const int m = int(it / npb), b = int(it % npb);
    if (empty) {
      std::fill(v, v + 32, 0.0f);
    } else {
      const float* p0 = j.groups[0].partial.as<float>() + size_t(m) * partial_ld(Hp) + size_t(b) * 32;
      for (int q = 0; q < 32; ++q) v[q] = p0[q];
      for (int g = 1; g < P.num_groups(); ++g) {
        const float* pg = j.groups[g].partial.as<float>() + size_t(m) * partial_ld(Hp) + size_t(b) * 32;
        for (int q = 0; q < 32; ++q) v[q] += pg[q];
      }
      for (int f = 0; f < nfix; ++f) {
        const Job::Worker& fw = j.workers[fix_w[f]];
        if (fw.fixup_block != b) continue;
        const float* pf = fw.fixup.as<float>() + size_t(m) * 32;
        for (int q = 0; q < 32; ++q) v[q] += pf[q];
      }
    }
    char* dst = static_cast<char*>(j.a.out) + (size_t(m) * j.a.ldo + size_t(b) * 32) * os;
    const int cols = std::min(32, H - b * 32);
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
  phase1(j, w, P.group_size(w.group));
  mk[3] = now_ns();
  P.barrier_group(w);
  mk[4] = now_ns();
  phase2(j, w, P.group_size(w.group));
  mk[5] = now_ns();
  P.barrier_all(w);
  mk[6] = now_ns();
  reduce(j, w, P);
  mk[7] = now_ns();
  int64_t t = mk[7], prev = j.end_ns.load();
  while (t > prev && !j.end_ns.compare_exchange_weak(prev, t)) {
  }
}

namespace {
bool fits(const Engine::Job& j, const MoELayer& L, int M, int k) {
  const size_t A = size_t(M) * k;
  if (j.row_token.size() < A || j.count.size() < size_t(L.E())) return false;
  if (j.xg.size() < A * act_ld(L.Hp()) * j.act) return false;
  if (j.workers[0].fixup.size() < size_t(M) * 32 * 4) return false;
  for (size_t g = 0; g < j.groups.size(); ++g) {
    if (j.groups[g].partial.size() < size_t(M) * partial_ld(L.Hp()) * 4) return false;
    if (j.groups[g].hbuf.size() < A * act_ld(L.slices()[g].inp) * j.act) return false;
  }
  return true;
}
}  // namespace

void Engine::submit(MoELayer* layer, const ForwardArgs& args) {
  std::lock_guard<std::mutex> lock(submit_mu_);
  if (!pool_->done()) wait();
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
  j.active.resize(layer->E_);
  j.start_ns = now_ns();
  j.end_ns.store(j.start_ns);
  calls_.fetch_add(1, std::memory_order_relaxed);
  tokens_.fetch_add(args.M, std::memory_order_relaxed);
  pool_->submit(&Engine::run_job, this);
}

void Engine::wait() {
  pool_->wait();
  Job& j = *job_;
  if (!j.is_pf && j.layer) {
    busy_ns_.fetch_add(uint64_t(j.end_ns.load() - j.start_ns), std::memory_order_relaxed);
    assignments_.fetch_add(uint64_t(j.A), std::memory_order_relaxed);
    invalid_.fetch_add(j.invalid.exchange(0), std::memory_order_relaxed);
    const auto& m0 = j.marks[0];
    ph_[0] += m0[1] - m0[0];
    ph_[1] += m0[2] - m0[1];
    ph_[2] += m0[4] - m0[2];
    ph_[3] += m0[6] - m0[4];
    ph_[4] += m0[7] - m0[6];
    int64_t p1max = 0, p1sum = 0, p2max = 0, p2sum = 0;
    for (const auto& m : j.marks) {
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

MoELayer::MoELayer(std::shared_ptr<Engine> engine, int E, int H, int I, DType wtype)
    : engine_(std::move(engine)), E_(E), H_(H), I_(I), wtype_(wtype) {
  if (E <= 0 || H <= 0 || I <= 0) throw std::invalid_argument("experts, hidden and intermediate sizes must be positive");
  if (wtype != DType::bf16 && wtype != DType::f16) throw std::invalid_argument("expert weights must be bfloat16 or float16");
  ks_ = choose_kernels(wtype, engine_->config().isa_cap);
  if (!ks_) throw std::runtime_error("no kernel for these weights on this CPU");
  Hp_ = int(round_up(H, K_ALIGN));
  const int groups = engine_->num_groups();
  // Split I across groups in multiples of 32 so that only the last slice pads.
  int per = int(round_up((I + groups - 1) / groups, 32));
  int i0 = 0;
  for (int g = 0; g < groups; ++g) {
    Slice s;
    s.i0 = std::min(i0, I);
    s.in = std::max(0, std::min(per, I - s.i0));
    s.inp = int(round_up(std::max(s.in, 1), K_ALIGN));
    int node = engine_->pool().group_numa_node(g);
    s.w13.reset(size_t(E) * s.inp * Hp_ * 2 * 2, node);
    s.w2.reset(size_t(E) * Hp_ * s.inp * 2, node);
    slices_.push_back(std::move(s));
    i0 += per;
  }
  loaded_.assign(E, 0);
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
    uint16_t* panel = s.w13.as<uint16_t>() + (size_t(e) * npan + li / 16) * panel_elems(Hp);
    const int c = (li % 16) + (up ? 16 : 0);
    for (int k = 0; k < H; ++k) panel[panel_offset(c, k)] = to_w(row, k, st, L.weight_type());
  }
}

// One source row of down ([I] for hidden row h) split over the slices.
void pack_down_row(MoELayer& L, int e, int h, const void* row, DType st) {
  const int npb = L.Hp() / 32;
  for (const Slice& s : L.slices()) {
    if (s.in == 0) continue;
    uint16_t* panel = s.w2.as<uint16_t>() + (size_t(e) * npb + h / 32) * panel_elems(s.inp);
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
  for (size_t it = b; it < e; ++it) {
    const int ex = c.todo[it].first, part = c.todo[it].second;
    const int rows = part == 2 ? L.H() : L.I();
    const int cols = part == 2 ? L.I() : L.H();
    for (int r = 0; r < rows; ++r) {
      uint64_t s = c.seed ^ (uint64_t(ex) << 40) ^ (uint64_t(part) << 32) ^ uint64_t(r) * 0x100000001b3ull;
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
  size_t rows = part == Part::down ? H_ : part == Part::gate_up ? 2 * size_t(I_) : I_;
  size_t cols = part == Part::down ? I_ : H_;
  if (ld < cols) throw std::invalid_argument("row stride smaller than the row");
  PackCtx ctx{this, e, part, src, st, ld};
  engine_->parallel_for(rows, &pack_rows, &ctx);
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
