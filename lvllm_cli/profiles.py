"""Profiles (lvllm_cli/profiles/*.yaml) and the resolution of `lvllm tune|serve NAME|DIR`.

A profile names a model (a hub id / local path, or a model lvllm generates),
its vLLM arguments, recommended settings and the model facts to plan with
before the checkpoint is downloaded.  The schema is documented in
docs/readme/profiles.md; `load_profile_text` checks every key and reports the
file, line and dotted key of the first problem.

Built-in profiles ship inside the package; files in `<lvllm home>/profiles`
add to them (or replace one with the same name).
"""

from __future__ import annotations

import difflib
import os
import re
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from lvllm_cli.model_facts import ConfigError, ModelFacts, facts_from_config, read_config
from lvllm_cli.paths import lvllm_home, user_profiles_dir


class ProfileError(ValueError):
    """A profile file, a profile name or a model directory that cannot be used; the message says why and how to fix it."""


# ---- settings ----------------------------------------------------------------


@dataclass
class Settings:
    """What the planner aims for; it may lower max_model_len / max_num_seqs to fit unless they were given explicitly."""

    max_model_len: int = 32768
    max_num_seqs: int = 4
    max_num_batched_tokens: int = 8192
    gpu_memory_utilization: float = 0.90
    gpu_layers: int | None = None  # None = auto (as many as fit)

    def merged(self, overrides: dict[str, Any]) -> Settings:
        return replace(self, **{k: v for k, v in overrides.items() if k in _SETTINGS_KEYS})


_SETTINGS_KEYS = ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "gpu_memory_utilization", "gpu_layers")

# vLLM options that the plan computes; a profile cannot pin them in vllm_args
# (use settings:, or pass them after `--`, which always wins).
MANAGED_VLLM_OPTIONS = {
    "model": "the model comes from the profile's model: key",
    "host": "use lvllm serve --host",
    "port": "use lvllm serve --port",
    "api-key": "use lvllm serve --api-key (never store keys in a profile)",
    "tensor-parallel-size": "the plan chooses TP; override with lvllm tune --tp",
    "pipeline-parallel-size": "the plan chooses PP; override with lvllm tune --pp",
    "max-model-len": "use settings.max_model_len",
    "max-num-seqs": "use settings.max_num_seqs",
    "max-num-batched-tokens": "use settings.max_num_batched_tokens",
    "gpu-memory-utilization": "use settings.gpu_memory_utilization",
}


@dataclass
class Generate:
    arch: str
    dir: str  # relative to the lvllm home


@dataclass
class Variant:
    name: str
    description: str = ""
    model: str | None = None
    facts: dict = field(default_factory=dict)
    vllm_args: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)


@dataclass
class Profile:
    name: str
    description: str
    model: str | None
    generate: Generate | None
    facts: dict
    vllm_args: dict
    settings: dict
    variants: dict[str, Variant]
    path: str

    def facts_for(self, variant: str | None) -> dict:
        facts = dict(self.facts)
        if variant:
            facts = _deep_merge(facts, self.variants[variant].facts)
        return facts


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# ---- YAML with line numbers --------------------------------------------------


def _key_lines(node: yaml.Node, path: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    """Map each dotted key path of a YAML document to its 1-based line."""
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            key = k.value if isinstance(k, yaml.ScalarNode) else str(k)
            p = path + (key,)
            out[p] = k.start_mark.line + 1
            _key_lines(v, p, out)
    return out


class _Checker:
    def __init__(self, filename: str, lines: dict[tuple, int]):
        self.filename = filename
        self.lines = lines

    def fail(self, path: tuple, problem: str) -> None:
        line = None
        for n in range(len(path), 0, -1):
            line = self.lines.get(path[:n])
            if line:
                break
        where = f"{self.filename}:{line}" if line else self.filename
        key = ".".join(str(p) for p in path) or "(top level)"
        raise ProfileError(f"{where}: {key}: {problem}")

    def mapping(self, value: Any, path: tuple, allowed: dict[str, str], required: tuple = ()) -> dict:
        if not isinstance(value, dict):
            self.fail(path, f"expected a mapping of keys, got {_kind(value)}")
        for key in value:
            if not isinstance(key, str):
                self.fail(path, f"keys must be text, got {key!r}")
            if key not in allowed:
                close = difflib.get_close_matches(key, list(allowed), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else f" (allowed: {', '.join(allowed)})"
                self.fail(path + (key,), f"unknown key{hint}")
        for key in required:
            if key not in value:
                self.fail(path, f"missing required key {key!r}: {allowed[key]}")
        return value

    def text(self, value: Any, path: tuple, pattern: str | None = None, what: str = "") -> str:
        if not isinstance(value, str) or not value.strip():
            self.fail(path, f"expected non-empty text, got {_kind(value)}")
        if pattern and not re.fullmatch(pattern, value):
            self.fail(path, f"{value!r} is not {what}")
        return value

    def positive_int(self, value: Any, path: tuple) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            self.fail(path, f"expected a positive integer, got {_kind(value)}")
        return value


def _kind(value: Any) -> str:
    if value is None:
        return "nothing (null)"
    if isinstance(value, (dict, list)):
        return type(value).__name__
    return f"{value!r}"


_NAME = r"[a-z0-9][a-z0-9._-]*"
_TOP = {
    "name": "the profile name used on the command line (lower case, digits, . _ -)",
    "description": "one line shown by `lvllm profiles`",
    "model": "hub id (org/name) or local path of the checkpoint",
    "generate": "a model lvllm writes itself (demo): {arch, dir}",
    "facts": "config.json keys used until the checkpoint's own config.json is available",
    "vllm_args": "extra vLLM options: {option-name: value}",
    "settings": "recommended max_model_len, max_num_seqs, max_num_batched_tokens, gpu_memory_utilization, gpu_layers",
    "variants": "alternative checkpoints: {name: {description, model, facts, vllm_args, settings}}",
}
_VARIANT = {k: _TOP[k] for k in ("description", "model", "facts", "vllm_args", "settings")}
_SETTINGS = {
    "max_model_len": "context length in tokens",
    "max_num_seqs": "sequences decoded together",
    "max_num_batched_tokens": "tokens per scheduler step (prefill chunk)",
    "gpu_memory_utilization": "fraction of each GPU's memory vLLM may use (0-1]",
    "gpu_layers": "'auto' or how many MoE layers keep their experts on the GPU",
}
_GENERATE = {"arch": "architecture for tiny_models.write_tiny_model", "dir": "directory name under the lvllm home"}


def _check_settings(c: _Checker, value: Any, path: tuple) -> dict:
    c.mapping(value, path, _SETTINGS)
    out: dict[str, Any] = {}
    for k, v in value.items():
        p = path + (k,)
        if k == "gpu_memory_utilization":
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1:
                c.fail(p, f"expected a fraction in (0, 1], got {_kind(v)}")
            out[k] = float(v)
        elif k == "gpu_layers":
            if v == "auto":
                out[k] = None
            elif isinstance(v, bool) or not isinstance(v, int) or v < 0:
                c.fail(p, f"expected 'auto' or a non-negative integer, got {_kind(v)}")
            else:
                out[k] = v
        else:
            out[k] = c.positive_int(v, p)
    return out


def _check_vllm_args(c: _Checker, value: Any, path: tuple) -> dict:
    if not isinstance(value, dict):
        c.fail(path, f"expected a mapping of vLLM options, got {_kind(value)}")
    for k, v in value.items():
        p = path + (str(k),)
        if not isinstance(k, str) or not re.fullmatch(r"[a-z0-9][a-z0-9_-]*", k):
            c.fail(p, "option names are written without leading dashes, e.g. tool-call-parser")
        norm = k.replace("_", "-")
        if norm in MANAGED_VLLM_OPTIONS:
            c.fail(p, f"managed by lvllm: {MANAGED_VLLM_OPTIONS[norm]}")
        scalars = (str, int, float, bool)
        ok = isinstance(v, scalars) or isinstance(v, dict) or (isinstance(v, list) and all(isinstance(x, scalars) for x in v))
        if not ok:
            c.fail(p, f"expected text, a number, true/false, a list or a mapping, got {_kind(v)}")
    return dict(value)


def _check_facts(c: _Checker, value: Any, path: tuple) -> dict:
    if not isinstance(value, dict):
        c.fail(path, f"expected a mapping of config.json keys, got {_kind(value)}")
    return value


def load_profile_text(text: str, filename: str) -> Profile:
    """Parse and validate one profile; ProfileError points at the bad key."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{filename}:{mark.line + 1}" if mark else filename
        raise ProfileError(f"{where}: not valid YAML: {getattr(e, 'problem', None) or e}") from None
    c = _Checker(filename, _key_lines(node) if node is not None else {})
    if data is None:
        c.fail((), "the file is empty")
    c.mapping(data, (), _TOP, required=("name",))
    name = c.text(data["name"], ("name",), _NAME, "a valid profile name (lower case letters, digits, . _ -)")
    if ("model" in data) == ("generate" in data):
        c.fail((), "give exactly one of 'model' (a checkpoint to serve) or 'generate' (a model lvllm writes)")
    model = c.text(data["model"], ("model",)) if "model" in data else None
    generate = None
    if "generate" in data:
        g = c.mapping(data["generate"], ("generate",), _GENERATE, required=("arch", "dir"))
        gen_dir = c.text(g["dir"], ("generate", "dir"), r"[A-Za-z0-9._-]+", "a plain directory name")
        arch = c.text(g["arch"], ("generate", "arch"))
        from lvllm_cli.tiny_models import TINY  # plain data; torch is only imported to write weights

        if arch not in TINY:
            c.fail(("generate", "arch"), f"lvllm cannot write a {arch!r} model; it can write: {', '.join(TINY)}")
        generate = Generate(arch=arch, dir=gen_dir)
    desc = c.text(data["description"], ("description",)) if "description" in data else ""
    facts = _check_facts(c, data.get("facts", {}), ("facts",))
    vllm_args = _check_vllm_args(c, data.get("vllm_args", {}), ("vllm_args",))
    settings = _check_settings(c, data.get("settings", {}), ("settings",))
    variants: dict[str, Variant] = {}
    raw_variants = data.get("variants", {})
    if not isinstance(raw_variants, dict):
        c.fail(("variants",), f"expected a mapping of variant names, got {_kind(raw_variants)}")
    for vname, vdata in raw_variants.items():
        p = ("variants", str(vname))
        if not isinstance(vname, str) or not re.fullmatch(_NAME, vname):
            c.fail(p, "variant names are lower case letters, digits, . _ -")
        c.mapping(vdata if vdata is not None else {}, p, _VARIANT)
        vdata = vdata or {}
        variants[vname] = Variant(
            name=vname,
            description=c.text(vdata["description"], p + ("description",)) if "description" in vdata else "",
            model=c.text(vdata["model"], p + ("model",)) if "model" in vdata else None,
            facts=_check_facts(c, vdata.get("facts", {}), p + ("facts",)),
            vllm_args=_check_vllm_args(c, vdata.get("vllm_args", {}), p + ("vllm_args",)),
            settings=_check_settings(c, vdata.get("settings", {}), p + ("settings",)),
        )
    profile = Profile(name, desc, model, generate, facts, vllm_args, settings, variants, filename)
    # The facts must describe a plannable MoE model on their own (tune works offline).
    for vname in [None, *variants]:
        try:
            facts_from_config(profile.facts_for(vname))
        except ConfigError as e:
            path = ("facts",) if vname is None else ("variants", vname, "facts")
            c.fail(path, f"{e}")
    return profile


def load_profile_file(path: Path) -> Profile:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot read the profile: {e}") from None
    return load_profile_text(text, str(path))


def builtin_profiles() -> dict[str, Profile]:
    out: dict[str, Profile] = {}
    root = resources.files("lvllm_cli") / "profiles"
    for entry in sorted(root.iterdir(), key=lambda e: e.name):
        if entry.name.endswith((".yaml", ".yml")):
            p = load_profile_text(entry.read_text(encoding="utf-8"), f"lvllm_cli/profiles/{entry.name}")
            out[p.name] = p
    return out


def all_profiles() -> dict[str, Profile]:
    """Built-in profiles, plus (and overridden by) the user's `<lvllm home>/profiles/*.yaml`."""
    out = builtin_profiles()
    udir = user_profiles_dir()
    if udir.is_dir():
        for f in sorted(udir.iterdir()):
            if f.suffix in (".yaml", ".yml"):
                p = load_profile_file(f)
                out[p.name] = p
    return out


# ---- resolving NAME | DIR | FILE ----------------------------------------------


@dataclass
class Target:
    """What to serve: the model argument for vLLM, its facts and the settings to aim for."""

    name: str
    variant: str | None
    model: str  # what vLLM receives: hub id or absolute local path
    model_dir: Path | None  # local checkpoint directory, when there is one
    facts: ModelFacts
    settings: Settings
    vllm_args: dict
    profile: Profile | None = None
    generate: Generate | None = None  # set when the model must still be written (demo)
    notes: list[str] = field(default_factory=list)


def _is_local_model(model: str) -> bool:
    """A profile's model: is a local path when it is written like one or names an existing directory."""
    return model.startswith((".", "/", "~")) or Path(model).expanduser().is_dir()


def hf_cache_config(repo_id: str) -> Path | None:
    """config.json of a hub checkpoint already in the local Hugging Face cache (no network)."""
    roots = []
    if os.environ.get("HF_HUB_CACHE"):
        roots.append(Path(os.environ["HF_HUB_CACHE"]))
    if os.environ.get("HF_HOME"):
        roots.append(Path(os.environ["HF_HOME"]) / "hub")
    xdg = os.environ.get("XDG_CACHE_HOME")
    roots.append((Path(xdg) if xdg else Path.home() / ".cache") / "huggingface" / "hub")
    folder = "models--" + repo_id.replace("/", "--")
    for root in roots:
        repo = root / folder
        if not repo.is_dir():
            continue
        ref = repo / "refs" / "main"
        if ref.is_file():
            cfg = repo / "snapshots" / ref.read_text().strip() / "config.json"
            if cfg.is_file():
                return cfg
        snaps = sorted((repo / "snapshots").glob("*/config.json"), key=lambda p: p.stat().st_mtime, reverse=True)
        if snaps:
            return snaps[0]
    return None


def _facts_from_dir(model_dir: Path) -> ModelFacts:
    cfg_path = model_dir / "config.json"
    try:
        return facts_from_config(read_config(model_dir), source=str(cfg_path))
    except ConfigError as e:
        msg = str(e)
        raise ProfileError(msg if str(cfg_path) in msg else f"{cfg_path}: {msg}") from None


def profile_names_text(profiles: dict[str, Profile]) -> str:
    return ", ".join(sorted(profiles)) or "(none)"


def resolve(arg: str, variant: str | None = None, profiles: dict[str, Profile] | None = None) -> Target:
    """Turn the NAME|DIR|FILE argument of tune/serve into a Target; ProfileError with a fix otherwise."""
    if not arg or not arg.strip():
        raise ProfileError("give a profile name or a model directory (see `lvllm profiles`)")
    path = Path(arg).expanduser()
    pathlike = "/" in arg or arg.startswith((".", "~"))
    if arg.endswith((".yaml", ".yml")):
        if not path.is_file():
            raise ProfileError(f"profile file {arg} not found")
        return resolve_profile(load_profile_file(path), variant)
    profiles = all_profiles() if profiles is None else profiles
    # A bare word is a profile name first; write ./NAME for a directory that shares a profile's name.
    if path.is_dir() and (pathlike or arg.partition(":")[0] not in profiles):
        return _resolve_dir(path, variant)
    if pathlike:
        if path.exists():
            raise ProfileError(f"{arg} is not a directory: give the model directory (the one holding config.json)")
        raise ProfileError(f"model directory {arg} does not exist")
    name, _, inline_variant = arg.partition(":")
    if inline_variant:
        if variant and variant != inline_variant:
            raise ProfileError(f"two variants given: {arg!r} and --variant {variant}")
        variant = inline_variant
    if name not in profiles:
        close = difflib.get_close_matches(name, list(profiles), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ProfileError(
            f"unknown profile {name!r}.{hint} Known profiles: {profile_names_text(profiles)}; "
            "or give a model directory (one holding config.json)"
        )
    return resolve_profile(profiles[name], variant)


def _resolve_dir(path: Path, variant: str | None) -> Target:
    if variant:
        raise ProfileError(f"--variant {variant} only applies to profiles; {path} is a model directory")
    model_dir = path.resolve()
    facts = _facts_from_dir(model_dir)
    return Target(
        name=model_dir.name,
        variant=None,
        model=str(model_dir),
        model_dir=model_dir,
        facts=facts,
        settings=Settings(max_model_len=min(Settings().max_model_len, facts.max_position_embeddings)),
        vllm_args={},
        notes=[f"no profile: facts from {model_dir / 'config.json'}, default settings"],
    )


def resolve_profile(prof: Profile, variant: str | None) -> Target:
    if variant and variant not in prof.variants:
        known = ", ".join(prof.variants) or "none"
        raise ProfileError(f"profile {prof.name!r} has no variant {variant!r} (variants: {known})")
    var = prof.variants[variant] if variant else None
    settings = Settings().merged(prof.settings)
    if var:
        settings = settings.merged(var.settings)
    vllm_args = {**prof.vllm_args, **(var.vllm_args if var else {})}
    notes: list[str] = []
    model_dir: Path | None = None
    generate = None
    if prof.generate:
        model_dir = lvllm_home() / prof.generate.dir
        model = str(model_dir)
        if not (model_dir / "config.json").is_file():
            generate = prof.generate
            model_dir = None
    else:
        model = (var.model if var and var.model else prof.model) or ""
        local = Path(model).expanduser()
        if _is_local_model(model):
            if not local.is_dir():
                raise ProfileError(f"profile {prof.name!r}: model directory {model} does not exist")
            model_dir = local.resolve()
            model = str(model_dir)
    facts = None
    if model_dir is not None:
        facts = _facts_from_dir(model_dir)
    elif not prof.generate:
        cached = hf_cache_config(model)
        if cached is not None:
            try:
                facts = facts_from_config(read_config(cached.parent), source=str(cached))
            except ConfigError as e:
                notes.append(f"ignored the cached {cached}: {e}")
    if facts is None:
        label = f"{prof.name}:{variant}" if variant else prof.name
        facts = facts_from_config(prof.facts_for(variant), source=f"profile {label} (no local config.json yet)")
    if generate:
        notes.append(f"the demo model will be written to {lvllm_home() / generate.dir} on the first `lvllm serve`")
    return Target(
        name=prof.name,
        variant=variant,
        model=model,
        model_dir=model_dir,
        facts=facts,
        settings=settings,
        vllm_args=vllm_args,
        profile=prof,
        generate=generate,
        notes=notes,
    )
