"""From a plan to the exact `vllm serve` command line and environment.

The command is `[sys.executable, "-m", "vllm.entrypoints.cli.main", "serve", MODEL, ...]`
rather than a `vllm` script found on PATH or next to the interpreter:
- it runs vLLM in the very interpreter (and virtual environment) lvllm runs
  in, the one where the `lvllm_moe` plugin entry point is installed: a `vllm`
  on PATH may belong to another environment that has no plugin at all;
- console scripts are missing in some installs (`pip install --target`,
  zipapps, `python -m lvllm_cli`) and their shebangs can point elsewhere;
- `vllm.entrypoints.cli.main` is the module the `vllm` script itself calls
  (checked in the 0.26 and 0.33 wheels).

Options after `--` pass through to vLLM unchanged and win: every option lvllm
would emit that the user also gives is dropped from lvllm's part, and the ones
the plan depends on (TP, PP, context, sequences, utilization, KV dtype) are
fed back to the planner first, so the CPU sets still match what vLLM will do.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lvllm_cli.paths import lvllm_home

VLLM_MODULE = "vllm.entrypoints.cli.main"

# vLLM's short aliases for the options lvllm manages.
_ALIASES = {"tp": "tensor-parallel-size", "pp": "pipeline-parallel-size", "q": "quantization", "dp": "data-parallel-size"}


class ServeError(ValueError):
    """A serve request that cannot be honoured; the message names the fix."""


# ---- options after `--` -----------------------------------------------------------------


def split_options(argv: list[str]) -> list[tuple[str | None, list[str]]]:
    """['--a', '1', '--b', '--c=2', 'x'] -> [('a', ['1']), ('b', []), ('c', ['2', 'x'])].

    Names are normalized (no dashes, '_' -> '-', short aliases expanded).  Words
    before the first option come back under the name None.
    """
    out: list[tuple[str | None, list[str]]] = []
    for tok in argv:
        if tok.startswith("-") and len(tok) > 1 and not _is_number(tok):
            name, eq, value = tok.lstrip("-").partition("=")
            name = name.replace("_", "-")
            name = _ALIASES.get(name, name)
            out.append((name, [value] if eq else []))
        elif out:
            out[-1][1].append(tok)
        else:
            out.append((None, [tok]))
    return out


def _is_number(tok: str) -> bool:
    return re.fullmatch(r"-\d+(\.\d+)?", tok) is not None


def human_int(text: str, option: str) -> int:
    """vLLM's integer syntax for lengths: 32768, 32k (x1000), 32K (x1024)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)([kKmMgG]?)\s*", text)
    if not m:
        raise ServeError(f"{option} {text!r}: expected an integer such as 32768, 32k or 32K")
    number, suffix = m.groups()
    if not suffix:
        if "." in number:
            raise ServeError(f"{option} {text!r}: expected an integer")
        return int(number)
    if suffix.islower():
        return int(float(number) * {"k": 10**3, "m": 10**6, "g": 10**9}[suffix])
    if "." in number:
        raise ServeError(f"{option} {text!r}: decimals are not allowed with {suffix}; write {number}{suffix.lower()}")
    return int(number) * {"K": 2**10, "M": 2**20, "G": 2**30}[suffix]


@dataclass
class Overrides:
    """What the options after `--` change in the plan and in the supervisor."""

    tp: int | None = None
    pp: int | None = None
    max_model_len: int | None = None
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    gpu_memory_utilization: float | None = None
    kv_cache_dtype_bytes: int | None = None
    host: str | None = None
    port: int | None = None
    api_key: bool = False
    served_model_name: str | None = None
    names: set[str] = field(default_factory=set)


def read_overrides(extra: list[str]) -> Overrides:
    ov = Overrides()
    for name, values in split_options(extra):
        if name is None:
            raise ServeError(
                f"unexpected {values[0]!r} after --: only vLLM options go there (the model is the first argument of lvllm serve)"
            )
        ov.names.add(name)
        first = values[0] if values else None

        def need(kind: str) -> str:
            if first is None:
                raise ServeError(f"--{name} after -- needs {kind}")
            return first

        if name == "model":
            raise ServeError("--model after --: give the model as the first argument of lvllm serve")
        if name == "tensor-parallel-size":
            ov.tp = _positive(need("a number"), name)
        elif name == "pipeline-parallel-size":
            ov.pp = _positive(need("a number"), name)
        elif name == "max-model-len":
            v = need("a length")
            if v.strip().lower() not in ("auto", "-1"):  # vLLM then picks; lvllm plans with its own value
                ov.max_model_len = human_int(v, "--max-model-len")
        elif name == "max-num-seqs":
            ov.max_num_seqs = _positive(need("a number"), name)
        elif name == "max-num-batched-tokens":
            ov.max_num_batched_tokens = human_int(need("a number"), "--max-num-batched-tokens")
        elif name == "gpu-memory-utilization":
            try:
                u = float(need("a fraction"))
            except ValueError:
                raise ServeError(f"--gpu-memory-utilization {first!r}: expected a fraction such as 0.9") from None
            if not 0 < u <= 1:
                raise ServeError(f"--gpu-memory-utilization {first}: must be in (0, 1]")
            ov.gpu_memory_utilization = u
        elif name == "kv-cache-dtype":
            ov.kv_cache_dtype_bytes = 1 if need("a dtype").startswith("fp8") else None
        elif name == "host":
            ov.host = need("an address")
        elif name == "port":
            ov.port = _port(need("a port"))
        elif name == "api-key":
            ov.api_key = True
        elif name == "served-model-name":
            ov.served_model_name = need("a name")
    return ov


def _positive(text: str, name: str) -> int:
    if not text.isdigit() or int(text) <= 0:
        raise ServeError(f"--{name} {text!r}: expected a positive integer")
    return int(text)


def _port(text: str) -> int:
    if not str(text).isdigit() or not 0 < int(text) < 65536:
        raise ServeError(f"port {text!r}: expected a number from 1 to 65535")
    return int(text)


def merge_args(ours: list[str], extra: list[str]) -> list[str]:
    """Our options minus every one the user also gives, then the user's options verbatim."""
    theirs = {name for name, _ in split_options(extra) if name}
    kept: list[str] = []
    for name, values in split_options(ours):
        if name in theirs:
            continue
        kept += ([f"--{name}"] if name else []) + values
    return kept + list(extra)


# ---- the command -----------------------------------------------------------------------------


@dataclass
class Command:
    argv: list[str]
    env: dict[str, str]  # what lvllm sets on top of the inherited environment
    secret_env: set[str]  # names whose values are never printed
    host: str
    port: int
    model_name: str  # the name clients send in "model"
    metrics_dir: str

    def shell(self, reveal: bool = False) -> str:
        env = " ".join(f"{k}={shlex.quote('***' if k in self.secret_env and not reveal else v)}" for k, v in self.env.items())
        return f"env {env} {shlex.join(self.argv)}"

    def to_dict(self) -> dict:
        return {
            "argv": self.argv,
            "env": {k: ("***" if k in self.secret_env else v) for k, v in self.env.items()},
            "host": self.host,
            "port": self.port,
            "url": base_url(self.host, self.port),
            "model_name": self.model_name,
            "metrics_dir": self.metrics_dir,
        }


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def base_url(host: str, port: int) -> str:
    """Where a local client reaches the server (wildcard binds are reached on loopback)."""
    h = host.strip("[]")
    if h in ("0.0.0.0", ""):
        h = "127.0.0.1"
    elif h == "::":
        h = "::1"
    if ":" in h:
        h = f"[{h}]"
    return f"http://{h}:{port}"


def server_log_path(port: int) -> Path:
    """Where `lvllm serve` keeps the log of the server on `port` (the dashboard's log pane reads it)."""
    return lvllm_home() / "logs" / f"server-{port}.log"


def metrics_dir_for(port: int, environ: dict[str, str] | None = None) -> Path:
    """Where the plugin of the server on `port` publishes the CPU-expert figures and the monitor
    reads them (one rule for both sides: lvllm_cli.monitor.engine_metrics)."""
    from lvllm_cli.monitor.engine_metrics import server_metrics_dir

    return server_metrics_dir(port, environ)


def build_command(
    plan_model: str,
    plan_env: dict[str, str],
    plan_vllm_args: list[str],
    *,
    extra: list[str],
    host: str,
    port: int,
    api_key: str | None,
    python: str | None = None,
    inherited_env: dict[str, str] | None = None,
) -> Command:
    ov = read_overrides(extra)
    host = ov.host or host
    port = ov.port or port
    ours = [*plan_vllm_args, "--host", host, "--port", str(port)]
    argv = [python or sys.executable, "-m", VLLM_MODULE, "serve", plan_model, *merge_args(ours, extra)]
    env = dict(plan_env)
    inherited = os.environ if inherited_env is None else inherited_env
    metrics = metrics_dir_for(port, inherited)
    env["LVLLM_METRICS_DIR"] = str(metrics)
    secret: set[str] = set()
    if api_key:
        # The environment, unlike argv, is not readable by other users (/proc/PID/environ is private).
        env["VLLM_API_KEY"] = api_key
        secret.add("VLLM_API_KEY")
    plugins = inherited.get("VLLM_PLUGINS")
    if plugins is not None and "lvllm_moe" not in [p.strip() for p in plugins.split(",")]:
        # The user filters vLLM plugins: keep theirs and add ours, or the CPU experts never load.
        env["VLLM_PLUGINS"] = ",".join([p for p in plugins.split(",") if p.strip()] + ["lvllm_moe"])
    return Command(
        argv=argv,
        env=env,
        secret_env=secret,
        host=host,
        port=port,
        model_name=ov.served_model_name or plan_model,
        metrics_dir=str(metrics),
    )


def curl_example(cmd: Command, api_key_from_env: bool) -> str:
    auth = ""
    if "VLLM_API_KEY" in cmd.env:
        key = "$LVLLM_API_KEY" if api_key_from_env else cmd.env["VLLM_API_KEY"]
        auth = f' -H "Authorization: Bearer {key}"'
    body = json.dumps({"model": cmd.model_name, "prompt": "def fibonacci(n):", "max_tokens": 64})
    return f"curl {base_url(cmd.host, cmd.port)}/v1/completions -H 'Content-Type: application/json'{auth} -d {shlex.quote(body)}"


# ---- vLLM presence -----------------------------------------------------------------------------


@dataclass
class VllmInstall:
    installed: bool
    version: str | None


def find_vllm() -> VllmInstall:
    """Is vLLM importable in this interpreter (without importing it: that takes seconds and pulls in torch)?"""
    if importlib.util.find_spec("vllm") is None:
        return VllmInstall(False, None)
    try:
        from importlib.metadata import PackageNotFoundError, version

        return VllmInstall(True, version("vllm"))
    except PackageNotFoundError:
        return VllmInstall(True, None)


# ---- saved plans -------------------------------------------------------------------------------


_PLAN_KEYS: dict[str, Any] = {
    "version": int,
    "model": str,
    "name": str,
    "tp": int,
    "pp": int,
    "workers": list,
    "gpu_layers": list,
    "fits": bool,
    "problems": list,
    "env": dict,
    "vllm_args": list,
}


def load_plan_file(path: Path) -> dict:
    """A plan saved by `lvllm tune --save`; ServeError naming the file and key when it is not one."""
    from lvllm_cli.plan import PLAN_VERSION

    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ServeError(f"plan file {path} not found (write one with `lvllm tune NAME --save {path}`)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ServeError(f"plan file {path} is not readable JSON: {e}") from None
    if not isinstance(data, dict):
        raise ServeError(f"plan file {path}: expected a JSON object written by `lvllm tune --save`")
    for key, typ in _PLAN_KEYS.items():
        if key not in data:
            raise ServeError(f"plan file {path}: missing {key!r}; write it again with `lvllm tune --save`")
        if not isinstance(data[key], typ) or (typ is int and isinstance(data[key], bool)):
            raise ServeError(f"plan file {path}: {key!r} should be {typ.__name__}, got {type(data[key]).__name__}")
    if data["version"] != PLAN_VERSION:
        raise ServeError(f"plan file {path}: version {data['version']} is not {PLAN_VERSION}; write it again with `lvllm tune --save`")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in data["env"].items()):
        raise ServeError(f"plan file {path}: 'env' must map names to strings")
    if not all(isinstance(a, str) for a in data["vllm_args"]):
        raise ServeError(f"plan file {path}: 'vllm_args' must be a list of strings")
    return data
