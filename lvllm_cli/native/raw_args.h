// Forward arguments from raw addresses, as the Python side passes them
// (torch's data_ptr()), checked once for every entry point that takes them.
#pragma once
#include <nanobind/nanobind.h>

#include <cstdint>
#include <string>

#include "engine.h"

namespace lk {

inline DType parse_dtype(const std::string& s) {
  if (s == "bfloat16" || s == "bf16") return DType::bf16;
  if (s == "float16" || s == "f16" || s == "half") return DType::f16;
  if (s == "float32" || s == "f32" || s == "float") return DType::f32;
  throw nanobind::value_error(("unknown dtype '" + s + "' (expected bfloat16, float16 or float32)").c_str());
}

// Contiguous rows unless ldx/ldo (elements) say otherwise; 0 means the hidden size.
inline ForwardArgs raw_forward_args(const MoELayer& l, uintptr_t x, const std::string& xt, size_t ldx, uintptr_t ids,
                                    bool ids64, uintptr_t tw, int M, int k, uintptr_t out, const std::string& ot,
                                    size_t ldo) {
  if (!x || !ids || !tw || !out) throw nanobind::value_error("null buffer pointer");
  if (M < 0 || k < 1) throw nanobind::value_error("bad token count or k");
  ForwardArgs a;
  a.x = reinterpret_cast<const void*>(x);
  a.x_type = parse_dtype(xt);
  a.ldx = ldx ? ldx : size_t(l.H());
  a.topk_ids = reinterpret_cast<const void*>(ids);
  a.ids_int64 = ids64;
  a.topk_weights = reinterpret_cast<const float*>(tw);
  a.M = M;
  a.k = k;
  a.out = reinterpret_cast<void*>(out);
  a.out_type = parse_dtype(ot);
  a.ldo = ldo ? ldo : size_t(l.H());
  return a;
}

}  // namespace lk
