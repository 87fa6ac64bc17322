"""Keep a quantized checkpoint's CPU experts quantized, or widen them to bf16 at load?

`LVLLM_EXPERTS_BF16=1` makes the plugin dequantize every CPU layer's experts
to bf16 while loading (quant_loading.dequantize_at_load).  That costs RAM (2x
of fp8, ~3.6x of int4) and decode speed (every token streams 2-4x more bytes)
and buys prefill speed (the bf16 AMX path without a per-call dequantization).
`choose_experts_format` is the planner's decision; plain data in and out.

The rule (docs/readme/tune.md states it too; keep them in step):

1. A 16-bit checkpoint, or a plan with no MoE layer on the CPU: nothing to
   decide, the CPU runs what the checkpoint holds.
2. bf16 must fit: the CPU layers' experts at 2 bytes per weight plus the same
   overheads the plan adds (4 GiB + 3 GiB per worker) within MemAvailable.
   Asked for explicitly (`--experts-format bf16`) and not fitting: refused,
   the plan gets a problem naming the fix, and the experts stay quantized.
3. `--experts-format quantized|bf16` is honoured otherwise.
4. `auto`: the engine time per generated token, per layer, for the workload's
   mix of P prompt tokens per generated token (`--prompt-ratio`, default 4):

       cost(format) = P / 128 x prefill_us(format, M=128) + decode_us(format, M=1)

   bf16 is chosen when cost(bf16) <= (1 - 0.10) x cost(quantized): it must
   save at least 10 % of the experts' engine time to be worth 2-4x the RAM
   (the mix is an estimate, and a tie should keep the smaller footprint).
   The rest of a token's time (GPU work, attention) is the same for both
   formats, so engine time alone decides.  The speeds are measured on this
   machine with `lvllm tune --measure`, else the known ratios below.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

GiB = 1 << 30

CHOICES = ("auto", "quantized", "bf16")
# Prefill is timed (and the known speeds were taken) with chunks of this many tokens.
PREFILL_TOKENS = 128
# Prompt tokens prefilled per generated token when the user does not say (--prompt-ratio): a chat-like
# mix.  Coding agents and RAG prefill far more per answer (20-50); prefix-cached tokens do not count.
DEFAULT_PROMPT_RATIO = 4.0
# bf16 must cut the experts' engine time by at least this fraction.
MIN_GAIN = 0.10


@dataclass(frozen=True)
class Speed:
    """Engine microseconds per MoE layer: one decode token (M=1) and one prefill chunk of PREFILL_TOKENS."""

    decode_us: float
    prefill_us: float

    def cost(self, prompt_ratio: float) -> float:
        """Engine time per generated token (per layer) when each one comes with `prompt_ratio` prompt tokens."""
        return prompt_ratio / PREFILL_TOKENS * self.prefill_us + self.decode_us


# Known speeds when nothing was measured: docs/PERFORMANCE.md, "Session 6: int4 on int8 activations", the
# prefetch sweep's LK_Q4_PREFETCH=2048 row (the default; `lvllm bench moe -m qwen3-30b-a3b -t 15`, GPU host,
# Xeon with AMX, 2026-11-24 22:18), µs per layer at decode M=1 and prefill M=128.  Only the ratios between
# formats matter: int4 (int8 activations) decodes 3.66x and fp8 1.79x faster than bf16; at prefill M=128
# (8 rows per expert) int4 is 1.69x faster than bf16 and bf16 2.05x faster than fp8.
KNOWN_SPEEDS_SOURCE = "engine ratios from docs/PERFORMANCE.md (Xeon with AMX)"
KNOWN_SPEEDS = {
    "bf16": Speed(decode_us=791.3, prefill_us=11321.3),
    "int4": Speed(decode_us=216.0, prefill_us=6699.0),
    "fp8": Speed(decode_us=443.1, prefill_us=23205.4),
}


@dataclass
class ExpertsFormat:
    """The decision and why; `Plan.experts_format` holds it as a dict."""

    checkpoint: str  # int4 | fp8 | bf16 | fp16: what the checkpoint's experts are
    requested: str  # auto | quantized | bf16
    widen: bool  # True: LVLLM_EXPERTS_BF16=1
    value: str  # the table's value column
    reason: str  # one line, with the numbers
    problem: str | None  # set when a request is refused
    speed_matters: bool  # the choice depends on speed (so --measure can change it)
    cpu_bytes_per_layer: int  # routed experts of one CPU layer as the engine holds them
    quantized_ram_bytes: int  # RAM need of the plan with the checkpoint's format (overheads included)
    bf16_ram_bytes: int  # the same, widened
    ram_available_bytes: int
    prompt_ratio: float
    speeds_source: str | None = None  # "measured on this machine" or KNOWN_SPEEDS_SOURCE
    speeds: dict | None = None  # {"quantized": Speed, "bf16": Speed} as dicts
    bf16_cost_ratio: float | None = None  # cost(bf16) / cost(quantized) at prompt_ratio
    break_even_prompt_ratio: float | None = None  # the prompt ratio from which auto widens (None: never/always)

    def to_dict(self) -> dict:
        return asdict(self)


def checkpoint_kind(method: str, dtype: str) -> str:
    """'int4' / 'fp8' for quantized experts, else the 16-bit dtype's short name."""
    if method in ("int4", "fp8"):
        return method
    return {"float16": "fp16", "fp16": "fp16", "half": "fp16"}.get(dtype, "bf16")


def break_even(quantized: Speed, bf16: Speed, min_gain: float = MIN_GAIN) -> float | None:
    """The prompt ratio from which bf16 saves min_gain; None when that does not depend on the ratio's size
    the usual way (bf16 decoding no slower, or prefilling no faster, than the allowed share)."""
    keep = 1.0 - min_gain
    a = bf16.prefill_us - keep * quantized.prefill_us  # per PREFILL_TOKENS prompt tokens
    b = bf16.decode_us - keep * quantized.decode_us  # per generated token
    if a < 0 < b:
        return PREFILL_TOKENS * b / -a
    return None


def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def choose_experts_format(
    *,
    method: str,
    dtype: str,
    requested: str = "auto",
    requested_by: str = "--experts-format",
    cpu_layers: int,
    quantized_bytes_per_layer: int,
    bf16_bytes_per_layer: int,
    ram_overhead_bytes: int,
    ram_available_bytes: int,
    prompt_ratio: float | None = None,
    measured: dict[str, Speed] | None = None,
) -> ExpertsFormat:
    """Decide per the module's rule.  `measured`: {"quantized": Speed, "bf16": Speed} from this machine."""
    if requested not in CHOICES:
        raise ValueError(f"experts format {requested!r}: expected one of {', '.join(CHOICES)}")
    ratio = DEFAULT_PROMPT_RATIO if prompt_ratio is None else float(prompt_ratio)
    if ratio < 0:
        raise ValueError(f"prompt ratio {ratio}: must be >= 0 (prompt tokens per generated token)")
    kind = checkpoint_kind(method, dtype)
    q_ram = cpu_layers * quantized_bytes_per_layer + ram_overhead_bytes
    b_ram = cpu_layers * bf16_bytes_per_layer + ram_overhead_bytes
    out = ExpertsFormat(
        checkpoint=kind, requested=requested, widen=False, value=f"{kind} (checkpoint)", reason="", problem=None,
        speed_matters=False, cpu_bytes_per_layer=quantized_bytes_per_layer, quantized_ram_bytes=q_ram,
        bf16_ram_bytes=b_ram, ram_available_bytes=ram_available_bytes, prompt_ratio=ratio,
    )  # fmt: skip
    asked = f"{requested_by} {requested}" if requested_by == "--experts-format" else requested_by

    def widen(reason: str) -> ExpertsFormat:
        out.widen, out.value, out.reason, out.cpu_bytes_per_layer = True, "bf16 (widened at load)", reason, bf16_bytes_per_layer
        return out

    def keep(reason: str) -> ExpertsFormat:
        out.value, out.reason = f"{kind} (quantized)", reason
        return out

    # 1. nothing to decide
    if kind not in ("int4", "fp8"):
        out.reason = f"{kind} checkpoint: the experts are 16-bit already, nothing to widen"
        if requested != "auto":
            out.reason += f" ({asked} changes nothing)"
        return out
    if cpu_layers == 0:
        out.reason = "no MoE layer runs on the CPU: nothing to widen"
        return out
    # 2. RAM
    fits = b_ram <= ram_available_bytes
    ram_text = (
        f"widened, the {cpu_layers} CPU layers need {_gib(cpu_layers * bf16_bytes_per_layer)} of experts "
        f"({_gib(b_ram)} with the overheads) instead of {_gib(cpu_layers * quantized_bytes_per_layer)} "
        f"({_gib(q_ram)}); {_gib(ram_available_bytes)} is available"
    )
    if requested == "bf16" and not fits:
        out.problem = (
            f"{asked}: not enough RAM to widen the experts to bf16: {ram_text}; "
            f"use --experts-format quantized{' (it fits)' if q_ram <= ram_available_bytes else ''} or auto"
        )
        out.value = f"{kind} (bf16 refused)"
        out.reason = f"bf16 was asked ({asked}) but does not fit: {ram_text}"
        return out
    # 3. explicit requests
    if requested == "bf16":
        return widen(f"as requested ({asked}): {ram_text}")
    if requested == "quantized":
        return keep(f"as requested ({asked})")
    # 4. auto
    if not fits:
        return keep(f"bf16 does not fit: {ram_text}")
    out.speed_matters = True
    if measured is not None:
        q, b = measured["quantized"], measured["bf16"]
        out.speeds_source = "measured on this machine (lvllm tune --measure)"
    else:
        q, b = KNOWN_SPEEDS[kind], KNOWN_SPEEDS["bf16"]
        out.speeds_source = KNOWN_SPEEDS_SOURCE + "; --measure times this machine"
    out.speeds = {"quantized": asdict(q), "bf16": asdict(b)}
    rel = b.cost(ratio) / q.cost(ratio)
    out.bf16_cost_ratio = round(rel, 4)
    be = break_even(q, b)
    out.break_even_prompt_ratio = round(be, 1) if be is not None else None
    facts = (
        f"at {ratio:g} prompt tokens per generated token (--prompt-ratio) bf16 experts take {rel:.2f}x the engine "
        f"time of {kind} (bf16 vs {kind}: {b.decode_us / q.decode_us:.2f}x the time at decode M=1, "
        f"{b.prefill_us / q.prefill_us:.2f}x at prefill M={PREFILL_TOKENS}; {out.speeds_source})"
    )
    where = f"; bf16 pays from --prompt-ratio {be:.1f}" if be is not None else ""
    if rel <= 1.0 - MIN_GAIN:
        return widen(f"{facts}, a saving of >= {MIN_GAIN:.0%}, and bf16 fits: {_gib(b_ram)} of {_gib(ram_available_bytes)}")
    return keep(f"{facts}; widening needs a saving of >= {MIN_GAIN:.0%}{where}")
