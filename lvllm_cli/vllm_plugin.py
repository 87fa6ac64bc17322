"""The seam into vLLM: routed experts on the CPU (entry point of `vllm.general_plugins`).

vLLM calls `register()` in every one of its processes before it builds the
model.  With LVLLM_MOE_CPU=1 it swaps vLLM's `RoutedExperts` for a subclass
whose CPU layers
  * create only `meta` placeholders for w13/w2 (nothing is allocated on the
    GPU, and 0.26's device_loading_context, which moves CPU parameters to the
    GPU while post-processing, has nothing to move),
  * take each checkpoint tensor from vLLM's loader, slice it for this
    tensor-parallel rank with vLLM's own `_load_w13` / `_load_w2` into a
    one-expert staging tensor, and pack it into lk_moe (peak memory: the
    packed experts plus one expert),
  * compute `forward_modular` through the stream-ordered host-call runner,
    so CUDA graphs capture it.
Quantized checkpoints (fp8; int4 as compressed-tensors, GPTQ or AWQ) keep
vLLM's quantization method for the parameter names and shapes only (created
on `meta`); their codes, scales and zero points go, as the checkpoint stores
them, to lk_moe through lvllm_cli/moe/quant_loading.py.
Layers named in LVLLM_GPU_LAYERS keep vLLM's own code.
All decisions live in lvllm_cli/moe/plugin_core.py and quant_loading.py.
"""

from __future__ import annotations

import logging
import os

log = logging.getLogger("lvllm")

_installed = False


def register() -> None:
    global _installed
    from lvllm_cli.moe import plugin_core

    if not plugin_core.enabled() or _installed:
        return
    import vllm

    from lvllm_cli.compat import SUPPORTED_VLLM, satisfies

    if not satisfies(vllm.__version__):
        raise RuntimeError(
            f"lvllm's CPU experts support vLLM {','.join(SUPPORTED_VLLM)}, but this is vLLM {vllm.__version__}; "
            f"install a supported vLLM (pip install 'vllm{','.join(SUPPORTED_VLLM)}') or unset LVLLM_MOE_CPU"
        )
    _install()
    _installed = True


def _install() -> None:
    import torch
    from vllm.config import get_current_vllm_config
    from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
    from vllm.model_executor.layers.fused_moe.fused_moe_method_base import FusedMoEMethodBase
    from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
    from vllm.model_executor.utils import set_weight_attrs

    from lvllm_cli.moe import plugin_core, quant_loading

    state: dict = {"gpu_layers": 0, "formats": set()}

    def experts_process(vllm_config):
        """One CpuExperts per worker process, created with the first CPU layer."""
        if "experts" not in state:
            from vllm.distributed import parallel_state as ps

            pc = vllm_config.parallel_config
            world = pc.tensor_parallel_size * pc.pipeline_parallel_size
            rank = ps.get_pp_group().rank_in_group * pc.tensor_parallel_size + ps.get_tp_group().rank_in_group
            state["experts"] = plugin_core.CpuExperts(
                os.environ, rank=rank, world=world, max_tokens=vllm_config.scheduler_config.max_num_batched_tokens
            )
            state["experts"].start_metrics()
            log.info("lvllm: CPU experts on %d threads (rank %d of %d)", state["experts"].engine.threads, rank, world)
        return state["experts"]

    class LvllmCpuMoEMethod(FusedMoEMethodBase):
        """Routed experts of one layer in lk_moe; the GPU only sees placeholders."""

        def __init__(self, moe, experts, layer_name, dummy, stock=None, scheme=None):
            super().__init__(moe)
            self.cpu = experts
            self.layer_name = layer_name
            self.dummy = dummy
            self.stock = stock  # vLLM's method for a quantized checkpoint: asked for parameter names/shapes only
            self.scheme = scheme

        def create_weights(self, layer, num_experts, hidden_size, intermediate_size_per_partition, params_dtype,
                           **extra_weight_attrs):
            unpadded = extra_weight_attrs.get("unpadded_hidden_size") or hidden_size
            if unpadded != hidden_size:
                raise RuntimeError(f"{self.layer_name}: padded hidden size ({unpadded} -> {hidden_size}) is not supported "
                                   "on the CPU path")
            if not self.moe.is_act_and_mul or self.moe.has_bias:
                raise RuntimeError(f"{self.layer_name}: lvllm's CPU experts implement gated SiLU experts without "
                                   "bias; keep this layer on the GPU (LVLLM_GPU_LAYERS)")
            if self.scheme is not None:
                # vLLM's own quantized parameters, so the model's load_weights finds every name it
                # maps checkpoint tensors to; on meta, so nothing is allocated anywhere.
                extra = dict(extra_weight_attrs)
                if type(self.stock).__name__ in quant_loading.NEEDS_INTERMEDIATE_SIZE_FULL:  # as vLLM passes it
                    extra["intermediate_size_full"] = layer.moe_config.intermediate_size
                before = {n for n, _ in layer.named_parameters(recurse=False)}
                with torch.device("meta"):
                    self.stock.create_weights(layer, num_experts, hidden_size, intermediate_size_per_partition,
                                              params_dtype, **extra)
                # MoeWNA16Method wraps the loader in one that repacks GPTQ/AWQ tensors on the GPU and
                # writes zero points into the (meta) parameters itself: every tensor of the method's
                # parameters must reach ours as the checkpoint stores it.
                for n, p in layer.named_parameters(recurse=False):
                    if n not in before and hasattr(p, "weight_loader"):
                        p.weight_loader = layer.weight_loader
                self.cpu.new_layer(self.layer_name, num_experts, hidden_size, intermediate_size_per_partition,
                                   "", scheme=self.scheme)
                if self.scheme.description not in state["formats"]:
                    state["formats"].add(self.scheme.description)
                    widened = " (widened to bf16 at load: LVLLM_EXPERTS_BF16=1)" \
                        if quant_loading.dequantize_at_load(os.environ) else ""
                    log.info("lvllm: quantized experts on the CPU: %s%s", self.scheme.description, widened)
                return
            dtype = str(params_dtype).replace("torch.", "")
            for name, shape in (
                ("w13_weight", (num_experts, 2 * intermediate_size_per_partition, hidden_size)),
                ("w2_weight", (num_experts, hidden_size, intermediate_size_per_partition)),
            ):
                p = torch.nn.Parameter(torch.empty(shape, dtype=params_dtype, device="meta"), requires_grad=False)
                layer.register_parameter(name, p)
                set_weight_attrs(p, extra_weight_attrs)
            self.cpu.new_layer(self.layer_name, num_experts, hidden_size, intermediate_size_per_partition, dtype)

        def get_fused_moe_quant_config(self, layer):
            return FUSED_MOE_UNQUANTIZED_CONFIG

        def process_weights_after_loading(self, layer):
            self.cpu.gpu_layer_count = state["gpu_layers"]  # every layer is built by now
            self.cpu.finish_layer(self.layer_name, dummy=self.dummy, seed=plugin_core.dummy_seed(self.layer_name))
            self.cpu.prepare(self.layer_name, layer.top_k, layer.params_dtype)

        def apply(self, layer, x, topk_weights, topk_ids, shared_experts, shared_experts_input):
            return self.cpu.run(self.layer_name, x, topk_ids, topk_weights)

    class LvllmRoutedExperts(RoutedExperts):
        _lvllm_cpu = False

        def _get_quant_method(self, prefix, quant_config, moe_config):
            vllm_config = get_current_vllm_config()
            hf = vllm_config.model_config.hf_text_config
            layers = plugin_core.gpu_layers(os.environ, int(getattr(hf, "num_hidden_layers", 0) or 10**6))
            index = plugin_core.layer_index(prefix)
            if index in layers:
                state["gpu_layers"] += 1
                return super()._get_quant_method(prefix, quant_config, moe_config)
            stock = scheme = None
            if quant_config is not None:
                stock = quant_config.get_quant_method(self, prefix)
                if stock is not None and type(stock).__name__ != "UnquantizedFusedMoEMethod":
                    scheme = quant_loading.scheme_for(stock, prefix)  # or a message naming the format
                else:
                    stock = None
            self._lvllm_cpu = True
            dummy = vllm_config.load_config.load_format == "dummy"
            return LvllmCpuMoEMethod(moe_config, experts_process(vllm_config), prefix, dummy, stock, scheme)

        def weight_loader(self, param, loaded_weight, weight_name, shard_id, expert_id, return_success=False):
            if not self._lvllm_cpu:
                return super().weight_loader(param, loaded_weight, weight_name, shard_id, expert_id, return_success)
            ok = self._lvllm_load(loaded_weight, weight_name, shard_id, expert_id)
            return ok if return_success else None

        def _lvllm_load(self, loaded_weight, weight_name, shard_id, expert_id) -> bool:
            method: LvllmCpuMoEMethod = self.quant_method
            if method.scheme is not None:
                what = quant_loading.role(weight_name, method.scheme)  # codes / scales / zeros / g_idx, or a message
                if what is None:
                    return True  # activation scales, shapes: nothing the CPU needs
                loadable = True
            else:
                loadable = "weight" in weight_name and "scale" not in weight_name
            if not loadable or shard_id not in quant_loading.SHARD_PARTS:
                raise RuntimeError(f"{self.layer_name}: cannot load {weight_name!r} ({shard_id}) onto the CPU experts")
            if loaded_weight.dim() == 3:  # a fused [E, ...] tensor handed to the loader directly
                return all([self._lvllm_load(w, weight_name, shard_id, e) for e, w in enumerate(loaded_weight.unbind())])
            local = self._map_global_expert_id_to_local_expert_id(expert_id)
            if local == -1:
                return False  # another rank's expert (expert parallel)
            src = loaded_weight.to("cpu")
            part = quant_loading.SHARD_PARTS[shard_id]
            tp_rank = self.moe_config.tp_rank
            if method.scheme is not None:
                mine = quant_loading.rank_slice(src, part, tp_rank, self.moe_config.moe_parallel_config.tp_size,
                                                transposed=method.scheme.transposed)
                method.cpu.add_quantized(method.layer_name, local, part, what, mine)
                return True
            engine_layer = method.cpu.layers[method.layer_name]
            I, H = engine_layer.intermediate, engine_layer.hidden
            # vLLM's own slicing (TP narrowing, padding rules) into a one-expert staging tensor.
            if part == "down":
                staging = torch.zeros(H, I, dtype=src.dtype)
                self._load_w2(expert_data=staging, shard_dim=1, loaded_weight=src, tp_rank=tp_rank)
                engine_layer.load_expert(local, part, staging)
            else:
                staging = torch.zeros(2 * I, H, dtype=src.dtype)
                self._load_w13(expert_data=staging, shard_dim=0, shard_id=shard_id, loaded_weight=src, tp_rank=tp_rank)
                engine_layer.load_expert(local, part, staging[:I] if part == "gate" else staging[I:])
            return True

    LvllmRoutedExperts.weight_loader.supports_moe_loading = True  # type: ignore[attr-defined]
    LvllmRoutedExperts.__name__ = "LvllmRoutedExperts"
    RoutedExperts.register_oot(LvllmRoutedExperts)
    log.info("lvllm: routed experts run on the CPU (LVLLM_GPU_LAYERS=%r)", os.environ.get("LVLLM_GPU_LAYERS", ""))
