// AMX-BF16 tiles for experts that receive many tokens (prefill).  Rows that
// do not fill a 16-row tile go to the AVX512-BF16 kernel.
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

// 32 tokens x 32 output rows.
void tile32(const uint16_t* x, size_t ldx, const uint16_t* p, int K, float* y) {
  _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
  const size_t sx = ldx * 2;
  for (int kc = 0; kc < K / 32; ++kc) {
    const uint16_t* pk = p + size_t(kc) * 16 * 64;
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
  int t = 0;
  if (n >= 16) {
    configure_tiles();
    for (; t + 32 <= n; t += 32) tile32(x + t * ldx, ldx, p, K, y + t * 32);
    if (t + 16 <= n) { tile16(x + t * ldx, ldx, p, K, y + t * 32); t += 16; }
  }
  if (t < n) avx512bf16_panel_dot(x + t * ldx, ldx, n - t, p, K, y + t * 32);
}

const KernelSet kBf16{Isa::amx, "amx", DType::bf16, DType::bf16, panel_dot, avx512bf16_silu_mul};

}  // namespace

const KernelSet* const kAmxSets[2] = {&kBf16, nullptr};

}  // namespace lk
