// Python bindings of the lk_moe engine (nanobind; no torch headers: arrays
// arrive through DLPack, so one build serves every torch version).
#include <nanobind/nanobind.h>
#include <nanobind/ndarray.h>
#include <nanobind/stl/pair.h>
#include <nanobind/stl/shared_ptr.h>
#include <nanobind/stl/string.h>
#include <nanobind/stl/vector.h>

#include <stdexcept>

#include "bench_native.h"
#include "cpu_features.h"
#include "engine.h"
#include "hostfn.h"
#include "raw_args.h"
#include "numa_mem.h"

namespace nb = nanobind;
using namespace nb::literals;

#ifndef LK_BUILD_FLAGS
#define LK_BUILD_FLAGS "portable"
#endif

namespace {

using Array = nb::ndarray<nb::device::cpu, nb::c_contig>;
using AnyArray = nb::ndarray<nb::device::cpu>;

using lk::parse_dtype;

// Element type of a float array; `raw16` names the type of uint16 bit patterns.
lk::DType float_dtype(const AnyArray& a, const char* what, const std::string& raw16 = "") {
  auto d = a.dtype();
  if (d.lanes != 1) throw nb::type_error((std::string(what) + ": vector dtypes are not supported").c_str());
  if (d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 32) return lk::DType::f32;
  if (d.code == uint8_t(nb::dlpack::dtype_code::Float) && d.bits == 16) return lk::DType::f16;
  if (d.code == uint8_t(nb::dlpack::dtype_code::Bfloat) && d.bits == 16) return lk::DType::bf16;
  if (d.code == uint8_t(nb::dlpack::dtype_code::UInt) && d.bits == 16 && !raw16.empty()) return parse_dtype(raw16);
  throw nb::type_error((std::string(what) + " must be bfloat16, float16 or float32" +
                        (raw16.empty() ? "" : " (or uint16 bit patterns with dtype=...)"))
                           .c_str());
}

// Row stride in elements of a 2-D array whose rows are contiguous.
size_t row_stride(const AnyArray& a, const char* what, size_t rows, size_t cols) {
  if (a.ndim() != 2) throw nb::value_error((std::string(what) + " must be 2-D").c_str());
  if (size_t(a.shape(0)) != rows || size_t(a.shape(1)) != cols)
    throw nb::value_error((std::string(what) + " has shape (" + std::to_string(a.shape(0)) + ", " + std::to_string(a.shape(1)) +
                           "), expected (" + std::to_string(rows) + ", " + std::to_string(cols) + ")")
                              .c_str());
  if (cols > 1 && a.stride(1) != 1)
    throw nb::value_error((std::string(what) + " must have contiguous rows (call .contiguous())").c_str());
  if (rows > 1 && a.stride(0) < int64_t(cols))
    throw nb::value_error((std::string(what) + " rows overlap").c_str());
  return rows > 1 ? size_t(a.stride(0)) : cols;
}

lk::WeightFormat parse_format(const std::string& s, int group) {
  lk::WeightFormat wf;
  if (s == "bfloat16" || s == "bf16") wf.kind = lk::WKind::bf16;
  else if (s == "float16" || s == "f16" || s == "half") wf.kind = lk::WKind::f16;
  else if (s == "int4") wf.kind = lk::WKind::int4;
  else if (s == "fp8" || s == "fp8_e4m3" || s == "float8_e4m3fn") wf.kind = lk::WKind::fp8;
  else throw nb::value_error(("unknown expert weight format '" + s + "' (expected bfloat16, float16, int4 or fp8)").c_str());
  wf.group = group;
  return wf;
}

lk::Part parse_part(const std::string& s) {
  if (s == "gate" || s == "w1") return lk::Part::gate;
  if (s == "up" || s == "w3") return lk::Part::up;
  if (s == "down" || s == "w2") return lk::Part::down;
  if (s == "gate_up" || s == "w13") return lk::Part::gate_up;
  throw nb::value_error(("unknown expert part '" + s + "' (expected gate, up, gate_up or down)").c_str());
}

std::shared_ptr<lk::Engine> make_engine(const std::vector<std::pair<int, std::vector<int>>>& groups, int spin_us,
                                        const std::string& isa_cap) {
  lk::EngineConfig cfg;
  for (auto& g : groups) cfg.groups.push_back(lk::NodeGroup{g.first, g.second});
  cfg.spin_us = spin_us;
  if (!lk::isa_from_name(isa_cap, &cfg.isa_cap)) throw nb::value_error(("unknown ISA cap '" + isa_cap + "'").c_str());
  try {
    return std::make_shared<lk::Engine>(std::move(cfg));
  } catch (const std::invalid_argument& e) {
    throw nb::value_error(e.what());
  }
}

nb::dict stats_dict(const lk::EngineStats& s) {
  nb::dict d;
  d["calls"] = s.calls;
  d["tokens"] = s.tokens;
  d["assignments"] = s.assignments;
  d["invalid_ids"] = s.invalid_ids;
  d["busy_ns"] = s.busy_ns;
  nb::dict ph;
  ph["route"] = s.route_ns; ph["gather"] = s.gather_ns; ph["gate_up"] = s.gateup_ns; ph["down"] = s.down_ns;
  ph["reduce"] = s.reduce_ns; ph["gate_up_work_max"] = s.gateup_work_max_ns; ph["gate_up_work_mean"] = s.gateup_work_mean_ns;
  ph["down_work_max"] = s.down_work_max_ns; ph["down_work_mean"] = s.down_work_mean_ns;
  ph["wake_first"] = s.wake_first_ns; ph["wake_last"] = s.wake_last_ns;
  d["phase_ns"] = ph;
  return d;
}

}  // namespace

NB_MODULE(_lk_moe, m) {
  m.doc() = "lk_moe: NUMA-aware CPU engine for routed MoE experts";

  nb::register_exception_translator([](const std::exception_ptr& p, void*) {
    try {
      std::rethrow_exception(p);
    } catch (const std::invalid_argument& e) {
      PyErr_SetString(PyExc_ValueError, e.what());
    }
  });

  m.def("cpu_features", []() {
    const lk::CpuFeatures& f = lk::cpu_features();
    nb::dict d;
    d["avx2"] = f.avx2; d["fma"] = f.fma; d["f16c"] = f.f16c;
    d["avx512f"] = f.avx512f; d["avx512bw"] = f.avx512bw; d["avx512vl"] = f.avx512vl;
    d["avx512_bf16"] = f.avx512_bf16; d["avx512_fp16"] = f.avx512_fp16;
    d["amx_tile"] = f.amx_tile; d["amx_bf16"] = f.amx_bf16; d["amx_int8"] = f.amx_int8;
    d["amx_permitted"] = f.amx_permitted;
    return d;
  }, "CPU features as seen by the engine (CPU support and OS enablement).");

  m.def("isa_supported", [](const std::string& name) {
    lk::Isa isa;
    if (!lk::isa_from_name(name, &isa)) throw nb::value_error(("unknown ISA variant: " + name).c_str());
    return lk::isa_supported(isa);
  });
  m.def("best_isa", []() { return std::string(lk::isa_name(lk::best_isa())); },
        "The best kernel family this CPU can run, capped by LK_ISA.");
  m.def("kernel_name", [](const std::string& weights, const std::string& cap) {
    lk::Isa c;
    if (!lk::isa_from_name(cap, &c)) throw nb::value_error(("unknown ISA variant: " + cap).c_str());
    const lk::KernelSet* ks = lk::choose_kernels(parse_dtype(weights), c);
    return std::string(ks ? ks->name : "none");
  }, "weights"_a, "cap"_a = "amx", "Kernel family that will run for these weights at this cap.");
  m.def("build_flavour", []() { return std::string(LK_BUILD_FLAGS); });
  m.def("numa_status", []() {
    const lk::NumaStatus& s = lk::numa_status();
    nb::dict d;
    d["library_loaded"] = s.library_loaded;
    d["max_node"] = s.max_node;
    d["detail"] = s.detail;
    return d;
  });

  nb::class_<lk::Engine>(m, "Engine")
      .def(nb::new_(&make_engine), "groups"_a, "spin_us"_a = 2000, "isa_cap"_a = "amx",
           "groups: list of (numa_node or -1, [cpu or -1 per worker]).")
      .def_prop_ro("num_groups", &lk::Engine::num_groups)
      .def_prop_ro("threads", [](lk::Engine& e) { return e.pool().total(); })
      .def_prop_ro("unpinned", [](lk::Engine& e) { return e.pool().unpinned(); })
      .def_prop_ro("groups", [](lk::Engine& e) {
        std::vector<std::pair<int, std::vector<int>>> out;
        for (auto& g : e.pool().groups()) out.emplace_back(g.numa_node, g.cpus);
        return out;
      })
      .def("stats", [](lk::Engine& e) { return stats_dict(e.stats()); })
      .def("reset_stats", &lk::Engine::reset_stats)
      .def("wait", &lk::Engine::wait, nb::call_guard<nb::gil_scoped_release>())
      .def_prop_ro("idle", &lk::Engine::idle)
      .def("reserve", [](lk::Engine& e, int tokens, int k, const lk::MoELayer& l) { e.reserve(tokens, k, l); },
           "tokens"_a, "k"_a, "layer"_a);

  nb::class_<lk::MoELayer>(m, "MoELayer")
      .def(
          "__init__",
          [](lk::MoELayer* self, std::shared_ptr<lk::Engine> engine, int E, int H, int I, const std::string& wtype, int group,
             bool int8_activations) {
            lk::WeightFormat wf = parse_format(wtype, group);
            wf.int8_activations = int8_activations;
            new (self) lk::MoELayer(std::move(engine), E, H, I, wf);
          },
          "engine"_a, "experts"_a, "hidden"_a, "intermediate"_a, "weight_dtype"_a = "bfloat16", "group_size"_a = 0,
          "int8_activations"_a = true,
          "weight_dtype: bfloat16, float16, int4 or fp8; group_size: quantization group along K (0: per row); "
          "int8_activations: int4 decode on int8 activations where the CPU has VNNI (else bf16 activations)")
      .def_prop_ro("int8_activations", &lk::MoELayer::int8_activations)
      .def_prop_ro("weight_format", [](lk::MoELayer& l) { return std::string(lk::wkind_name(l.format().kind)); })
      .def_prop_ro("group_size", [](lk::MoELayer& l) { return l.format().group; })
      .def_prop_ro("expert_bytes", &lk::MoELayer::expert_bytes)
      .def_prop_ro("experts", &lk::MoELayer::E)
      .def_prop_ro("hidden", &lk::MoELayer::H)
      .def_prop_ro("intermediate", &lk::MoELayer::I)
      .def_prop_ro("weight_dtype", [](lk::MoELayer& l) { return std::string(lk::dtype_name(l.weight_type())); })
      .def_prop_ro("kernel", [](lk::MoELayer& l) { return std::string(l.kernels()->name); })
      .def_prop_ro("activation_dtype", [](lk::MoELayer& l) { return std::string(lk::dtype_name(l.kernels()->act)); })
      .def_prop_ro("packed_bytes", &lk::MoELayer::packed_bytes)
      .def_prop_ro("slices", [](lk::MoELayer& l) {
        std::vector<std::pair<int, int>> out;
        for (auto& s : l.slices()) out.emplace_back(s.i0, s.in);
        return out;
      })
      .def_prop_ro("loaded", [](lk::MoELayer& l) { return std::vector<int>(l.loaded().begin(), l.loaded().end()); })
      .def_prop_ro("complete", &lk::MoELayer::complete)
      .def(
          "load",
          [](lk::MoELayer& l, int e, const std::string& part, AnyArray src, const std::string& raw16) {
            lk::Part p = parse_part(part);
            size_t rows = p == lk::Part::down ? l.H() : p == lk::Part::gate_up ? 2 * size_t(l.I()) : l.I();
            size_t cols = p == lk::Part::down ? l.I() : l.H();
            lk::DType st = float_dtype(src, "expert weights", raw16.empty() ? std::string(lk::dtype_name(l.weight_type())) : raw16);
            size_t ld = row_stride(src, ("expert " + part + " weights").c_str(), rows, cols);
            nb::gil_scoped_release release;
            l.load(e, p, src.data(), st, ld);
          },
          "expert"_a, "part"_a, "weights"_a, "dtype"_a = "",
          "Pack one expert's gate [I,H], up [I,H], gate_up [2I,H] or down [H,I] weights.")
      .def(
          "load_quantized",
          [](lk::MoELayer& l, int e, const std::string& part, AnyArray q, AnyArray scales) {
            lk::Part p = parse_part(part);
            size_t rows = p == lk::Part::down ? l.H() : p == lk::Part::gate_up ? 2 * size_t(l.I()) : l.I();
            size_t cols = p == lk::Part::down ? l.I() : l.H();
            auto qt = q.dtype();
            const bool int4 = l.format().kind == lk::WKind::int4;
            if (qt.bits != 8 || (int4 ? qt.code != uint8_t(nb::dlpack::dtype_code::Int) : qt.code != uint8_t(nb::dlpack::dtype_code::UInt)))
              throw nb::type_error(int4 ? "int4 codes must be an int8 array of values in [-8, 7]"
                                        : "fp8 codes must be a uint8 array of e4m3 bytes (tensor.view(torch.uint8))");
            size_t ldq = row_stride(q, ("expert " + part + " codes").c_str(), rows, cols);
            if (scales.dtype() != nb::dtype<float>()) throw nb::type_error("scales must be float32");
            size_t groups = l.format().group > 0 ? (cols + l.format().group - 1) / l.format().group : 1;
            size_t lds = row_stride(scales, ("expert " + part + " scales").c_str(), rows, groups);
            nb::gil_scoped_release release;
            l.load_quantized(e, p, q.data(), ldq, static_cast<const float*>(scales.data()), lds);
          },
          "expert"_a, "part"_a, "codes"_a, "scales"_a,
          "Pack one expert part of a quantized layer: codes [rows, cols], scales [rows, groups] float32.")
      .def("fill_random", &lk::MoELayer::fill_random, "seed"_a = 0, "scale"_a = 1e-3f,
           nb::call_guard<nb::gil_scoped_release>())
      .def(
          "forward",
          [](lk::MoELayer& l, AnyArray x, AnyArray ids, AnyArray tw, AnyArray out, const std::string& raw16) {
            lk::ForwardArgs a;
            if (x.ndim() != 2) throw nb::value_error("hidden states must be 2-D [tokens, hidden]");
            a.M = int(x.shape(0));
            a.x_type = float_dtype(x, "hidden states", raw16);
            a.ldx = row_stride(x, "hidden states", a.M, l.H());
            if (ids.ndim() != 2 || size_t(ids.shape(0)) != size_t(a.M))
              throw nb::value_error("topk_ids must be 2-D [tokens, k] with one row per token");
            a.k = int(ids.shape(1));
            if (a.k < 1) throw nb::value_error("topk_ids needs at least one column");
            auto idt = ids.dtype();
            if (idt.code != uint8_t(nb::dlpack::dtype_code::Int) || (idt.bits != 32 && idt.bits != 64))
              throw nb::type_error("topk_ids must be int32 or int64");
            a.ids_int64 = idt.bits == 64;
            if (row_stride(ids, "topk_ids", a.M, a.k) != size_t(a.k)) throw nb::value_error("topk_ids must be contiguous");
            if (tw.dtype() != nb::dtype<float>()) throw nb::type_error("topk_weights must be float32");
            if (row_stride(tw, "topk_weights", a.M, a.k) != size_t(a.k))
              throw nb::value_error("topk_weights must be contiguous with the shape of topk_ids");
            a.out_type = float_dtype(out, "out", raw16);
            a.ldo = row_stride(out, "out", a.M, l.H());
            a.x = x.data();
            a.topk_ids = ids.data();
            a.topk_weights = static_cast<const float*>(tw.data());
            a.out = out.data();
            nb::gil_scoped_release release;
            l.forward(a);
          },
          "x"_a, "topk_ids"_a, "topk_weights"_a, "out"_a, "dtype"_a = "",
          "out[m] = sum_j topk_weights[m,j] * expert_{topk_ids[m,j]}(x[m]); blocks until done.")
      .def(
          "submit_ptr",
          [](lk::MoELayer& l, uintptr_t x, const std::string& xt, size_t ldx, uintptr_t ids, bool ids64, uintptr_t tw, int M,
             int k, uintptr_t out, const std::string& ot, size_t ldo) {
            lk::ForwardArgs a = lk::raw_forward_args(l, x, xt, ldx, ids, ids64, tw, M, k, out, ot, ldo);
            nb::gil_scoped_release release;
            l.engine().submit(&l, a);
          },
          "x"_a, "x_dtype"_a, "ldx"_a, "topk_ids"_a, "ids_int64"_a, "topk_weights"_a, "tokens"_a, "k"_a, "out"_a,
          "out_dtype"_a, "ldo"_a,
          "Asynchronous forward on raw pointers; Engine.wait() completes it.  Ids out of range are skipped and counted.");

  m.def("read_bandwidth", [](lk::Engine& e, size_t bytes, int reps) {
    if (bytes < (1u << 20)) throw nb::value_error("measure at least 1 MiB (and more than the last-level cache)");
    nb::gil_scoped_release release;
    return lk::read_bandwidth(e, bytes, std::max(1, reps));
  }, "engine"_a, "bytes"_a, "reps"_a = 5, "GB/s of the engine's workers reading node-local memory (median of reps).");

  m.def("time_layers", [](std::vector<lk::MoELayer*> layers, uintptr_t x, const std::string& xt, uintptr_t ids, bool ids64,
                          uintptr_t tw, int M, int k, uintptr_t out, const std::string& ot, int steps, int passes) {
    if (layers.empty()) throw nb::value_error("no layers to time");
    if (steps < 1 || passes < 1) throw nb::value_error("steps and passes must be positive");
    lk::ForwardArgs a = lk::raw_forward_args(*layers[0], x, xt, 0, ids, ids64, tw, M, k, out, ot, 0);
    nb::gil_scoped_release release;
    return lk::time_layers(layers, a, steps, passes);
  }, "layers"_a, "x"_a, "x_dtype"_a, "topk_ids"_a, "ids_int64"_a, "topk_weights"_a, "tokens"_a, "k"_a, "out"_a,
     "out_dtype"_a, "steps"_a, "passes"_a,
     "Nanoseconds per forward call, layers cycled like a forward pass; ids/weights hold `steps` [tokens, k] sets.");

  m.def("kernel_ns", [](const std::string& isa, const std::string& weights, int n, int K, int reps, int ld_pad) {
    lk::Isa i;
    if (!lk::isa_from_name(isa, &i)) throw nb::value_error(("unknown ISA variant: " + isa).c_str());
    if (n < 1 || K < 32 || K % 32) throw nb::value_error("need n >= 1 and K a positive multiple of 32");
    nb::gil_scoped_release release;
    return lk::kernel_ns(i, parse_dtype(weights), n, K, std::max(1, reps), std::max(0, ld_pad));
  }, "isa"_a, "weights"_a, "n"_a, "K"_a, "reps"_a = 100, "ld_pad"_a = 32,
     "ns per panel_dot (32 rows x K, n tokens) with data in cache; -1 when the family cannot run here.");
  m.def("qkernel_ns", [](const std::string& isa, const std::string& kind, int n, int K, int G, int reps) {
    lk::Isa i;
    if (!lk::isa_from_name(isa, &i)) throw nb::value_error(("unknown ISA variant: " + isa).c_str());
    if (kind != "int4" && kind != "int4_int8" && kind != "fp8") throw nb::value_error("kind must be int4, int4_int8 or fp8");
    if (n < 1 || K < 32 || K % 32 || G < 32 || G % 32 || K % G) throw nb::value_error("need n >= 1, K and G multiples of 32, G dividing K");
    nb::gil_scoped_release release;
    return lk::qkernel_ns(i, kind == "fp8" ? lk::WKind::fp8 : lk::WKind::int4, kind == "int4_int8", n, K, G, std::max(1, reps));
  }, "isa"_a, "kind"_a, "n"_a, "K"_a, "G"_a, "reps"_a = 100,
     "ns per quantized decode dot (32 rows x K, n tokens, group G) with data in cache; -1 when the family has none.");

  lk::bind_hostfn(m);
}
