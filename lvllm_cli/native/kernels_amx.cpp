// AMX-BF16 tiles for experts that receive more than a couple of tokens.  A
// tile of 16 rows is cheaper than AVX512-BF16 from 3 rows up (measured on
// Emerald Rapids: 4.8 us per 16-row tile vs 1.8 us per row), so short row
// counts are padded up to a tile; one or two rows go to AVX512-BF16.
#include <immintrin.h>

#include "kernels.h"

namespace lk {
namespace {

struct alignas(64) TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// Tiles 0-3: C (fp32, 16 tokens x 16 rows); 4-5: A (16 tokens x 32 k);
// 6-7: B (16 k-pairs x 16 rows x 2).  All 16 x 64 bytes.
void configure_tiles() {
  static thread_local bool configured = false;
  if (configured) return;
  TileConfig cfg{};
  cfg.palette_id = 1;
  for (int i = 0; i < 8; ++i) {
    cfg.rows[i] = 16;
    cfg.colsb[i] = 64;
  }
  _tile_loadconfig(&cfg);
  configured = true;
}

// Tile loads cannot run far ahead (two B registers), so streaming weights
// from DRAM stalls on latency: prefetch the panel this many k-chunks (2 KiB
// each) ahead.
constexpr int PREFETCH_CHUNKS = 6;

inline void prefetch_chunk(const uint16_t* pk) {
  const char* c = reinterpret_cast<const char*>(pk);
  for (int l = 0; l < 2048; l += 64) _mm_prefetch(c + l, _MM_HINT_T0);
}

// 32 tokens x 32 output rows.
void tile32(const uint16_t* x, size_t ldx, const uint16_t* p, int K, float* y) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const size_t sx = ldx * 2;
  for (int kc = 0; kc < K / 32; ++kc) {
    const uint16_t* pk = p + size_t(kc) * 16 * 64;
    if (kc + PREFETCH_CHUNKS < K / 32) prefetch_chunk(pk + PREFETCH_CHUNKS * 16 * 64);
    _tile_loadd(4, x + kc * 32, sx);
    _tile_loadd(5, x + 16 * ldx + kc * 32, sx);
    _tile_loadd(6, pk, 128);
    _tile_loadd(7, pk + 32, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 5, 6);
    _tile_dpbf16ps(2, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, y, 128);
  _tile_stored(1, y + 16 * 32, 128);
  _tile_stored(2, y + 16, 128);
  _tile_stored(3, y + 16 * 32 + 16, 128);
}

// 16 tokens x 32 output rows.
void tile16(const uint16_t* x, size_t ldx, const uint16_t* p, int K, float* y) {
  _tile_zero(0); _tile_zero(2);
  const size_t sx = ldx * 2;
  for (int kc = 0; kc < K / 32; ++kc) {
    const uint16_t* pk = p + size_t(kc) * 16 * 64;
    if (kc + PREFETCH_CHUNKS < K / 32) prefetch_chunk(pk + PREFETCH_CHUNKS * 16 * 64);
    _tile_loadd(4, x + kc * 32, sx);
    _tile_loadd(6, pk, 128);
    _tile_loadd(7, pk + 32, 128);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(2, 4, 7);
  }
  _tile_stored(0, y, 128);
  _tile_stored(2, y + 16, 128);
}

void panel_dot(const void* xv, size_t ldx, int n, const void* pv, int K, float* y) {
  const uint16_t* x = static_cast<const uint16_t*>(xv);
  const uint16_t* p = static_cast<const uint16_t*>(pv);
  if (n < 3) {
    avx512bf16_panel_dot(x, ldx, n, p, K, y);
    return;
  }
  configure_tiles();
  int t = 0;
  for (; n - t > 16; t += 32) tile32(x + t * ldx, ldx, p, K, y + t * 32);  // the last may be padded
  if (n - t >= 3)
    tile16(x + t * ldx, ldx, p, K, y + t * 32);  // 3..16 rows left, padded
  else if (t < n)
    avx512bf16_panel_dot(x + t * ldx, ldx, n - t, p, K, y + t * 32);
}

const KernelSet kBf16{Isa::amx,           "amx",                DType::bf16,          DType::bf16,
                      panel_dot,          avx512bf16_silu_mul,  avx512bf16_q4_dot,    avx512bf16_f8_dot,
                      avx512bf16_dequant, avx512vnni_q4_dot_q8, avx512vnni_quantize_q8, avx512vnni_silu_mul_q8};

}  // namespace

const KernelSet* const kAmxSets[2] = {&kBf16, nullptr};

}  // namespace lk
