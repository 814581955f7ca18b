"""Experiment ConfigDict (configs/*.py) -> typed, validated configs; the only place that reads it.

An experiment config has these parts, each checked key by key (an unknown key is a ValueError naming the
nearest valid key):
  config.model       ModelConfig fields but max_len (config.data.seq_len); vocab_size 0 takes the
                     tokenizer's (a larger value pads the embedding, e.g. DeepSeekMoE 16B's 102400);
                     config.model.moe holds MoEConfig fields but d_model.
  config.data        moejax.data.DataConfig fields.
  config.train       TrainConfig fields (optimiser, schedule, loop).
  config.mesh        moejax.sharding.MeshConfig: devices along data, fsdp, expert, tensor (default: all
                     devices on data); a resumed run may change it (the checkpoint is resharded).
  config.seed        seeds parameter init and routing randomness (step s uses fold_in(seed, s));
                     data order has its own seed, config.data.shuffle_seed.
"""
from __future__ import annotations

import dataclasses
import difflib
from typing import Any

import ml_collections

from moejax import model_config, sharding

_require = model_config.require_for("TrainConfig")
SCHEDULES = ("deepseekmoe", "cosine", "constant")
UPCYCLE = ("none", "sparse", "fine_grained")  # moejax.upcycle


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Optimiser and loop. AdamW (Loshchilov & Hutter 2019) with global-norm clipping; weight decay on
    parameters with >= 2 dims. Schedules (linear warmup over `warmup_steps` in each):
      'deepseekmoe': then lr x `decay_factor` at each fraction of `steps` in `decay_at` (Dai et al. 2024
                     sec. 4.1.3: x0.316 at 80% and 90%);
      'cosine':      then cosine decay to lr * `min_lr_ratio` at `steps`;
      'constant':    then constant.
    One step = one optimiser update on data.batch_size sequences, split into `grad_accum` micro-batches.
    `peak_flops` per device for MFU (0 = look up the device kind; MFU is not logged if unknown).
    `init_from`: a moejax workdir (trained, or imported by moejax.convert) whose latest parameters start this
    run instead of random ones (at step 0 only; the optimiser starts fresh); `upcycle` says how
    (moejax.upcycle): 'none' (the same model: fine-tuning), 'sparse' or 'fine_grained' (MoE from a dense model).
    """

    steps: int = 100
    lr: float = 1e-3
    schedule: str = "deepseekmoe"
    warmup_steps: int = 10
    decay_at: tuple = (0.8, 0.9)
    decay_factor: float = 0.316
    min_lr_ratio: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    clip_norm: float = 1.0
    grad_accum: int = 1
    log_every: int = 10
    eval_every: int = 100
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    peak_flops: float = 0.0
    init_from: str = ""
    upcycle: str = "none"

    def __post_init__(self):
        for name in ("steps", "grad_accum", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints"):
            _require(getattr(self, name) >= 1, name, getattr(self, name), "an integer >= 1")
        _require(0 <= self.warmup_steps <= self.steps, "warmup_steps", self.warmup_steps,
                 f"0 <= warmup_steps <= steps={self.steps}")
        _require(self.lr > 0, "lr", self.lr, "> 0")
        _require(self.schedule in SCHEDULES, "schedule", self.schedule, str(SCHEDULES))
        _require(all(0 < a <= 1 for a in self.decay_at) and list(self.decay_at) == sorted(self.decay_at),
                 "decay_at", self.decay_at, "increasing fractions of steps in (0, 1]")
        _require(0 < self.decay_factor <= 1, "decay_factor", self.decay_factor, "0 < decay_factor <= 1")
        _require(0 <= self.min_lr_ratio <= 1, "min_lr_ratio", self.min_lr_ratio, "0 <= min_lr_ratio <= 1")
        for name in ("b1", "b2"):
            _require(0 <= getattr(self, name) < 1, name, getattr(self, name), "0 <= beta < 1")
        _require(self.upcycle in UPCYCLE, "upcycle", self.upcycle, str(UPCYCLE))
        _require(self.upcycle == "none" or bool(self.init_from), "upcycle", self.upcycle,
                 "'none' unless init_from names the dense model's workdir")
        for name in ("eps", "weight_decay", "clip_norm", "peak_flops"):
            _require(getattr(self, name) >= 0, name, getattr(self, name), ">= 0 (clip_norm 0 = no clipping)")


# Keys of config.train / config.data a resumed run may change (they do not change what is computed).
RUN_CONTROL = ("train.log_every", "train.eval_every", "train.checkpoint_every", "train.keep_checkpoints",
               "train.peak_flops", "data.worker_count", "data.eval_steps", "mesh.data", "mesh.fsdp", "mesh.expert",
               "mesh.tensor")


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """The typed experiment: model (vocab_size filled in by the tokenizer), data, train, seed, mesh."""

    model: dict  # ModelConfig kwargs but vocab_size, with moe a MoEConfig
    data: Any  # moejax.data.DataConfig
    train: TrainConfig
    seed: int
    mesh: sharding.MeshConfig = sharding.MeshConfig()
    vocab_size: int = 0  # config.model.vocab_size: 0 = the tokenizer's

    def model_config(self, tokenizer_vocab: int) -> model_config.ModelConfig:
        """The ModelConfig for a tokenizer of `tokenizer_vocab` ids."""
        if self.vocab_size and self.vocab_size < tokenizer_vocab:
            raise ValueError(f"config.model.vocab_size={self.vocab_size} is invalid; allowed: 0 (the tokenizer's) or "
                             f">= the tokenizer's vocabulary of {tokenizer_vocab}")
        return model_config.ModelConfig(vocab_size=self.vocab_size or tokenizer_vocab, max_len=self.data.seq_len,
                                     **self.model)


def experiment(model: dict, moe: model_config.MoEConfig, data: dict, train: dict, seed: int = 0, mesh: dict | None = None
               ) -> ml_collections.ConfigDict:
    """An experiment ConfigDict holding every field of the typed configs (defaults filled in), so that
    any of them can be overridden on the command line (--config.train.lr=...)."""
    from moejax import data as data_lib

    model_defaults = {f.name: f.default for f in dataclasses.fields(model_config.ModelConfig)
                      if f.name not in ("vocab_size", "max_len", "moe") and f.default is not dataclasses.MISSING}
    model_defaults["vocab_size"] = 0
    check_keys(model, set(model_defaults) | {"d_model", "n_layers", "n_heads"}, "model")
    c = ml_collections.ConfigDict()
    c.model = {**model_defaults, **model, "moe": moe_fields(moe)}
    c.data = {**dataclasses.asdict(data_lib.DataConfig()), **_checked(data, data_lib.DataConfig, "data")}
    c.train = {**dataclasses.asdict(TrainConfig()), **_checked(train, TrainConfig, "train")}
    c.seed = seed
    c.mesh = {**dataclasses.asdict(sharding.MeshConfig()), **_checked(mesh or {}, sharding.MeshConfig, "mesh")}
    return c


def moe_fields(moe: model_config.MoEConfig) -> dict:
    """config.model.moe of a MoEConfig: its fields but d_model (config.model.d_model)."""
    return {k: v for k, v in dataclasses.asdict(moe).items() if k != "d_model"}


def _checked(d: dict, cls, where: str) -> dict:
    check_keys(d, _fields(cls), where)
    return d


def load(spec: str) -> ml_collections.ConfigDict:
    """The experiment config of 'path/to/config.py[:arg]' (the file's get_config(arg))."""
    import importlib.util
    import os

    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"config file {path!r} does not exist; allowed: a configs/*.py path, optionally "
                                f"followed by :arg (e.g. configs/deepseekmoe_table1.py:method=gshard,scale=tiny)")
    module_spec = importlib.util.spec_from_file_location("experiment_config", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg) if arg else module.get_config()


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """big_vision-style config argument 'a=1,b=x' -> ConfigDict over `defaults` (types follow defaults)."""
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in defaults:
            raise ValueError(f"config argument {item!r} is invalid; allowed: comma-separated key=value with "
                             f"keys {tuple(defaults)}")
        kind = type(defaults[key])
        out[key] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def _nearest(key: str, valid) -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.0)
    return f"; did you mean {close[0]!r}?" if close else ""


def check_keys(given, valid, where: str) -> None:
    """ValueError for the first key of `given` not in `valid`, naming the nearest valid key."""
    for key in given:
        if key not in valid:
            raise ValueError(f"unknown config key {where}.{key}{_nearest(key, valid)} (known: {sorted(valid)})")


def _fields(cls, exclude=()) -> tuple[str, ...]:
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in exclude)


def _build(cls, d, where: str, exclude=(), **extra):
    d = dict(d)
    check_keys(d, _fields(cls, exclude), where)
    d = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}
    return cls(**d, **extra)


def to_typed(config: ml_collections.ConfigDict) -> RunConfig:
    """Validate the whole experiment config and translate it into typed configs."""
    from moejax import data as data_lib  # data imports tfds/grain: keep `import moejax.config` light

    c = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
    check_keys(c, ("model", "data", "train", "seed", "mesh"), "config")
    for part in ("model", "data", "train"):
        if part not in c:
            raise ValueError(f"config.{part} is missing; an experiment config has model, data, train and seed")
    m = dict(c["model"])
    model_keys = _fields(model_config.ModelConfig, ("max_len",))
    check_keys(m, model_keys, "config.model")
    vocab = m.pop("vocab_size", 0)
    if not (isinstance(vocab, int) and vocab >= 0):
        raise ValueError(f"config.model.vocab_size={vocab!r} is invalid; allowed: 0 (the tokenizer's) or an integer >= "
                         f"the tokenizer's vocabulary")
    if "moe" not in m:
        raise ValueError("config.model.moe is missing; give MoEConfig fields (n_experts=0, n_shared=1 for dense)")
    m["moe"] = _build(model_config.MoEConfig, m["moe"], "config.model.moe", ("d_model",), d_model=m.get("d_model", 0))
    model_config.ModelConfig(vocab_size=1, **m)  # validate now, before any data is read
    return RunConfig(model=m, data=_build(data_lib.DataConfig, c["data"], "config.data"),
                     train=_build(TrainConfig, c["train"], "config.train"), seed=int(c.get("seed", 0)),
                     mesh=_build(sharding.MeshConfig, c.get("mesh", {}), "config.mesh"), vocab_size=vocab)


def flatten(d: dict, prefix: str = "") -> list[tuple[str, Any]]:
    """Nested config dict -> [('a.b', value), ...] (tuples as lists, as in JSON)."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", list(v) if isinstance(v, tuple) else v))
    return out


def field_defaults() -> dict[str, Any]:
    """{'model.n_kv_heads': 0, ...}: the default of every field of the typed configs, flattened."""
    from moejax import data as data_lib

    parts = {"model": model_config.ModelConfig, "model.moe": model_config.MoEConfig, "data": data_lib.DataConfig,
             "train": TrainConfig, "mesh": sharding.MeshConfig}
    import json  # defaults as a config.json holds them (tuples as lists)

    return dict(flatten({f"{where}.{f.name}": json.loads(json.dumps(f.default)) for where, cls in parts.items()
                         for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}))


def incompatible(saved: dict, current: dict, ignore: tuple[str, ...] = RUN_CONTROL) -> list[str]:
    """Keys ('a.b') whose values differ between two config dicts, except `ignore`d keys. A key only one of
    them has counts as its field's default in the other: a field added to moejax after a run was saved
    changes nothing at its default (it keeps the behaviour that run had), so that run resumes and its
    results stay valid."""
    a, b = dict(flatten(saved)), dict(flatten(current))
    missing = object()
    defaults = field_defaults() if set(a) ^ set(b) else {}
    get = lambda d, k: d.get(k, defaults.get(k, missing))
    return [f"{k}: saved {a.get(k)!r}, now {b.get(k)!r}" for k in sorted(set(a) | set(b))
            if k not in ignore and get(a, k) != get(b, k)]


def expand_user_flags(argv: list[str]) -> list[str]:
    """'--flag=~/x' -> '--flag=/home/me/x' (the shell leaves a '~' after '=' alone), and '--flag ~/x' alike."""
    import os

    out = []
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if a.startswith("--") and eq and value.startswith("~"):
            a = f"{name}={os.path.expanduser(value)}"
        elif a.startswith("~") and i and argv[i - 1].startswith("--") and "=" not in argv[i - 1]:
            a = os.path.expanduser(a)
        out.append(a)
    return out


def _config_spec(argv: list[str]) -> str | None:
    """The value of --config=SPEC or --config SPEC in argv, if any."""
    for i, a in enumerate(argv):
        if a.startswith("--config="):
            return a.split("=", 1)[1]
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
    return None


def override(config: ml_collections.ConfigDict, key: str, value=None, *, flag: str = "--config.", check_only=False):
    """Set config's 'a.b.c' to value: the one check of command-line overrides (main, aot, the runner's --set).
    ValueError naming the flag, the key and the nearest existing key if config has no such key, or the key's
    type if value does not fit it. check_only: only check that the key exists."""
    parts, node = key.split("."), config
    for i, part in enumerate(parts):
        keys = list(node.keys()) if hasattr(node, "keys") else []
        if part not in keys:
            near = difflib.get_close_matches(part, keys, n=1, cutoff=0.0)
            hint = f"; did you mean {flag}{'.'.join(parts[:i] + near)}?" if near else ""
            raise ValueError(f"{flag}{key}: the config has no key {'.'.join(parts[:i + 1])}{hint}")
        if i < len(parts) - 1:
            node = node[part]
    if check_only:
        return
    try:
        node[parts[-1]] = value
    except TypeError as e:  # ConfigDict keeps each key's type
        raise ValueError(f"{flag}{key}={value!r} is invalid; allowed: a value of the key's type "
                         f"{type(node[parts[-1]]).__name__} (e.g. {node[parts[-1]]!r})") from e


def check_cli_config(argv: list[str]) -> None:
    """Load --config and check every --config.a.b override names a key it has, before absl parses the flags
    (which would print a traceback): a ValueError / FileNotFoundError naming the key or file otherwise."""
    spec = _config_spec(argv)
    if not spec:
        return  # absl reports the missing required flag
    config = load(spec)
    for key in (a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")):
        override(config, key, check_only=True)


def parse_cli_flags(argv: list[str]) -> list[str]:
    """absl flags parser for moejax's command lines (app.run(main, flags_parser=parse_cli_flags)): '~' expanded
    in flag values; a missing config file, an error in its get_config (e.g. an unknown method=), an unknown or
    ill-typed --config override and any other flag error end with one line `moejax: error: ...`, exit 1."""
    import sys

    from absl import flags

    argv = expand_user_flags(argv)
    try:
        check_cli_config(argv[1:])
        return flags.FLAGS(argv)
    except (ValueError, FileNotFoundError, KeyError, AttributeError, TypeError) as e:
        text = str(e.args[0]) if isinstance(e, (KeyError, AttributeError)) and e.args else str(e)
        sys.exit(f"moejax: error: {' '.join(text.split())}")
    except flags.Error as e:  # the last line of a wrapped error is the error itself
        lines = [l.strip() for l in str(e).splitlines() if l.strip() and not l.strip().startswith("File ")]
        sys.exit(f"moejax: error: {lines[-1] if lines else e}")
