"""A float32 reference for the end-to-end check: which of several vLLM runs is closer to the truth.

    python scripts/fp32_reference_score.py MODEL_DIR RUN.json [RUN.json ...] [--out FILE] [--device cpu|cuda]

MODEL_DIR: a tiny checkpoint (lvllm_cli.tiny_models): config.json and model.safetensors, or the
model.safetensors.part* pieces that `gpu_open_measurements.sh next-dump` writes (joined here into a
temporary copy).  RUN.json: vllm_run.py outputs scored on the same sequences (gpu_plugin_e2e.py gives
every variant the stock run's sequences with --score), e.g. /tmp/lvllm-e2e/logs/qwen3_next-stock.json
and qwen3_next-cpu_graphs.json.

The first run's score.sequences go through the model's transformers class in float32, one sequence at
a time, teacher forced.  Scored as vllm_run.py scores them (prompt logprobs): every token but the first,
log-softmax of the raw logits at the position before it.  Reports max and mean |delta logprob| and the
token count, each run against float32 and the first run against each other one (the same numbers as
gpu_plugin_e2e.py's compare(), which compares the stock run with the others).
"""

from __future__ import annotations

import argparse
import json
import shutil
import struct
import sys
import tempfile
from pathlib import Path


def load_runs(paths: list[Path]) -> list[tuple[str, dict]]:
    runs = []
    for p in paths:
        try:
            r = json.loads(p.read_text())
        except (OSError, ValueError) as e:
            sys.exit(f"{p}: cannot read a run JSON: {e}")
        score = r.get("score") if isinstance(r, dict) else None
        if not isinstance(score, dict) or "sequences" not in score or "logprobs" not in score:
            sys.exit(f"{p} has no score section: give the per-run JSONs vllm_run.py writes without --bench "
                     f"(gpu_plugin_e2e.py keeps them in $LVLLM_E2E_WORK/logs, e.g. qwen3_next-stock.json), "
                     f"not the e2e-*.json summary")
        if len(score["logprobs"]) != len(score["sequences"]) or any(
                len(lp) != len(s) for s, lp in zip(score["sequences"], score["logprobs"])):
            sys.exit(f"{p}: score.logprobs does not have one entry per token of score.sequences")
        label = p.stem if p.stem not in [name for name, _ in runs] else str(p)
        runs.append((label, score))
    first_path, first = paths[0], runs[0][1]["sequences"]
    for p, (_, score) in zip(paths[1:], runs[1:]):
        if score["sequences"] != first:
            n = len(score["sequences"])
            where = next((i for i, (a, b) in enumerate(zip(first, score["sequences"])) if a != b), min(n, len(first)))
            sys.exit(f"{p} scores other sequences than {first_path} ({n} vs {len(first)} sequences, first difference "
                     f"at sequence {where}): score both on the same ones (vllm_run.py --score SEQS.json, SEQS.json "
                     f"holding {first_path.name}'s score.sequences, as gpu_plugin_e2e.py does)")
    return runs


def joined_parts(model: Path, parts: list[Path], tmp: Path) -> Path:
    """model.safetensors.part* joined (in `cat` order) next to a copy of the config."""
    for name in ("config.json", "generation_config.json"):
        if (model / name).exists():
            shutil.copy(model / name, tmp / name)
    out = tmp / "model.safetensors"
    with open(out, "wb") as f:
        for part in parts:
            with open(part, "rb") as src:
                shutil.copyfileobj(src, f)
    # A lost or truncated part would otherwise surface as an opaque safetensors error.
    with open(out, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    want = 8 + n + max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if out.stat().st_size != want:
        sys.exit(f"{model}: {', '.join(p.name for p in parts)} join to {out.stat().st_size} bytes, the safetensors "
                 f"header says {want}: a part is missing or cut short; copy all of them again")
    return tmp


def weights_dir(model: Path, tmp: Path) -> Path:
    if not (model / "config.json").exists():
        sys.exit(f"{model}/config.json is missing: MODEL_DIR must be the tiny checkpoint the runs served "
                 f"(gpu_plugin_e2e.py writes it to $LVLLM_E2E_WORK/<arch>, default /tmp/lvllm-e2e/<arch>)")
    if (model / "model.safetensors").exists() or (model / "model.safetensors.index.json").exists():
        return model
    parts = sorted(model.glob("model.safetensors.part*"))
    if parts:
        return joined_parts(model, parts, tmp)
    sys.exit(f"{model} has no weights: copy the checkpoint's model.safetensors there, or its "
             f"model.safetensors.part* pieces (`gpu_open_measurements.sh next-dump` writes them to $OUT/next)")


def fp32_logprobs(model_dir: Path, sequences: list[list[int]], device: str) -> list[list[float | None]]:
    # fla / causal-conv1d are Triton kernels that may compute in tf32 or bf16: a reference takes transformers'
    # plain torch path (the lookup happens when transformers' model module is first imported).
    for name in ("fla", "causal_conv1d"):
        sys.modules.setdefault(name, None)
    import torch
    from transformers import AutoModelForCausalLM, PreTrainedModel

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False  # Qwen3-Next's short convolution goes through cuDNN on the GPU
    # Plain per-expert matmuls; transformers 4 (its experts always are) would hand the option to the model class.
    experts = {"experts_implementation": "eager"} if hasattr(PreTrainedModel, "set_experts_implementation") else {}
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager",
                                                 **experts).to(device).eval()
    out = []
    with torch.no_grad():
        for seq in sequences:  # one at a time: no padding, which linear attention's state would see
            ids = torch.tensor([seq], device=device)
            logits = model(input_ids=ids).logits[0, :-1].float()
            picked = torch.log_softmax(logits, dim=-1).gather(-1, ids[0, 1:, None])[:, 0]
            out.append([None, *picked.tolist()])
    return out


def compare(a: list[list], b: list[list]) -> dict:
    diffs = [abs(x - y) for ra, rb in zip(a, b) for x, y in zip(ra, rb) if x is not None and y is not None]
    return {"scored_tokens": len(diffs),
            "max_abs_logprob_diff": round(max(diffs), 6) if diffs else None,
            "mean_abs_logprob_diff": round(sum(diffs) / len(diffs), 6) if diffs else None}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("runs", type=Path, nargs="+")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    a = ap.parse_args(argv)

    runs = load_runs(a.runs)
    sequences = runs[0][1]["sequences"]
    config = json.loads((a.model / "config.json").read_text()) if (a.model / "config.json").exists() else {}
    vocab = config.get("vocab_size")
    if vocab and any(t >= vocab for s in sequences for t in s):
        sys.exit(f"{a.runs[0]} scores token ids past {a.model}'s vocab_size {vocab}: the runs were not of this model")
    with tempfile.TemporaryDirectory(prefix="fp32-ref-") as tmp:
        ref = fp32_logprobs(weights_dir(a.model, Path(tmp)), sequences, a.device)

    report = {"model": str(a.model), "device": a.device, "sequences": len(sequences),
              "vs_fp32": {name: compare(s["logprobs"], ref) for name, s in runs},
              "run_vs_run": {f"{name} vs {runs[0][0]}": compare(runs[0][1]["logprobs"], s["logprobs"])
                             for name, s in runs[1:]},
              "fp32_logprobs": ref}
    rows = [(f"{name} vs fp32", r) for name, r in report["vs_fp32"].items()] + list(report["run_vs_run"].items())
    width = max(len(label) for label, _ in rows)
    print(f"{a.model}: float32 on {a.device}, {len(sequences)} sequences")
    print(f"{'':{width}}  {'tokens':>7}  {'max |d logprob|':>15}  {'mean |d logprob|':>16}")
    for label, r in rows:
        mx, mean = (f"{v:.6f}" if v is not None else "-" for v in (r["max_abs_logprob_diff"], r["mean_abs_logprob_diff"]))
        print(f"{label:{width}}  {r['scored_tokens']:>7}  {mx:>15}  {mean:>16}")
    worst = min(r["mean_abs_logprob_diff"] or 0 for r in report["vs_fp32"].values())
    if worst > 0.5:  # bf16 rounding costs 0.01-0.1 per token on the tiny models, other weights whole nats
        print(f"warning: every run is {worst:.2f} nats per token from float32 on average: is {a.model} the "
              f"checkpoint they served? (a tiny model regenerated under another torch version has other weights)")
    if a.out:
        a.out.write_text(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
