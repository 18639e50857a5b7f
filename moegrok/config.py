"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

Jobs convert their DictConfig with `OmegaConf.to_object`, so `__post_init__` validation runs
at start-up and the library only ever sees these dataclasses. Choice fields are `StrEnum`s
(Hydra rejects any other value, naming the key); every other check raises a ConfigError that
names the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

from moegrok.errors import ConfigError

MISSING = "???"


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        shown = str(value) if isinstance(value, StrEnum) else value  # 'memorized', not <SampleSet.memorized: ...>
        raise ConfigError(f"config key {key}={shown!r}: expected {expected}")


def as_plain(cfg: object) -> dict:
    """A config dataclass as plain dicts, lists and scalars (enums as their values), for YAML
    and fingerprints."""
    import dataclasses
    import json

    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_yaml(cfg: object) -> str:
    """The resolved config as YAML (config.yaml, and the tags of every derived table)."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cfg)
    options = OmegaConf.select(node, "storage.options")
    for key in SECRET_OPTIONS & set(options or {}):  # credentials never go into the run dir
        options[key] = "<redacted>"
    return OmegaConf.to_yaml(node)


SECRET_OPTIONS = {"key", "secret", "token", "password", "session_token", "secret_key", "access_key"}


def _choice(enum: type[StrEnum], value: object, key: str) -> StrEnum:
    """`value` as a member of `enum` (configs built in Python get the same check Hydra makes)."""
    try:
        return enum(value)
    except ValueError:
        raise ConfigError(f"config key {key}={value!r}: expected one of {', '.join(enum)}") from None


def _is_prime(n: int) -> bool:
    return n >= 2 and all(n % d for d in range(2, int(n**0.5) + 1))


class ToyOperation(StrEnum):
    """The toy zoo's operations (moegrok.toy.data defines what each computes)."""

    add = "add"
    sub = "sub"
    mul = "mul"
    div = "div"
    sqsum = "sqsum"
    muladd = "muladd"  # a * b + a


class Schedule(StrEnum):
    constant = "constant"
    cosine = "cosine"
    wsd = "wsd"  # warmup, stable, then linear decay


class Dtype(StrEnum):
    auto = "auto"  # bf16 on GPU, fp32 on CPU
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Positions(StrEnum):
    all = "all"  # every token of a sample (the paper)
    answer = "answer"  # the positions that predict a scored token


class Engine(StrEnum):
    auto = "auto"  # vllm when the cluster has GPUs, else hf
    vllm = "vllm"
    hf = "hf"


class Sandbox(StrEnum):
    isolated = "isolated"  # generated code runs in the bubblewrap sandbox; without it the sweep stops at start-up
    unisolated = "unisolated"  # without bubblewrap, in a weaker fallback; every such score is marked


class TuneMethod(StrEnum):
    lora = "lora"


class TruncationPolicy(StrEnum):
    report = "report"  # cut samples to samples.max_tokens and say how many, of which groups, lost what
    error = "error"  # stop before any work instead


class Storage(StrEnum):
    tokens = "tokens"  # every token's top-k ids and weights
    compact = "compact"  # per sample the token-averaged weights (L x E); tokens for a subset only


class SampleSet(StrEnum):
    memorized = "memorized"
    all = "all"


class Stage(StrEnum):
    all = "all"
    record = "record"
    reduce = "reduce"
    tune = "tune"
    evaluate = "evaluate"
    analyze = "analyze"
    report = "report"


# --------------------------------------------------------------------------- toy zoo


@dataclass
class ToyGroupConfig:
    name: str = MISSING
    op: ToyOperation = ToyOperation.add
    train_fraction: float = 0.5
    # a canary: the op's prompts with random answers, fixed per sample and drawn with data.seed;
    # memorizable, never generalizable: a control known before training (docs/own-run.md)
    canary: bool = False


class ToyForm(StrEnum):
    """How a toy sample is written (moegrok.toy.data)."""

    plain = "plain"  # "a + b =" -> c: 5 tokens with the answer
    chain = "chain"  # "a + b = x ; b + x = y ; x + y =" -> z: three steps, intermediates written, 18 tokens


@dataclass
class ToyDataConfig:
    p: int = 47
    groups: list[ToyGroupConfig] = field(
        default_factory=lambda: [
            ToyGroupConfig("add", ToyOperation.add, 0.7),
            ToyGroupConfig("sub", ToyOperation.sub, 0.5),
            ToyGroupConfig("mul", ToyOperation.mul, 0.1),  # memorizes, never generalizes: a negative control
        ]
    )
    seed: int = 0
    form: ToyForm = ToyForm.plain

    def __post_init__(self) -> None:
        self.form = _choice(ToyForm, self.form, "data.form")
        _check(_is_prime(self.p), "data.p", self.p, "a prime number")
        _check(len(self.groups) > 0, "data.groups", self.groups, "at least one group")
        names = [g.name for g in self.groups]
        _check(len(set(names)) == len(names), "data.groups", names, "unique group names")
        for i, group in enumerate(self.groups):
            group.op = _choice(ToyOperation, group.op, f"data.groups[{i}].op")
            frac = group.train_fraction
            _check(0.0 < frac < 1.0, f"data.groups[{i}].train_fraction", frac, "a number in (0, 1)")


@dataclass
class ToyModelConfig:
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 4
    num_heads: int = 2
    num_experts: int = 8
    top_k: int = 2
    router_aux_loss_coef: float = 0.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        _check(self.hidden_size % self.num_heads == 0, "model.num_heads", self.num_heads,
               f"a divisor of model.hidden_size={self.hidden_size}")
        head_dim = self.hidden_size // self.num_heads
        _check(head_dim >= 32, "model.num_heads", self.num_heads,
               f"head_dim = hidden_size / num_heads >= 32 so vLLM can serve it (got {head_dim})")
        _check(1 <= self.top_k <= self.num_experts, "model.top_k", self.top_k,
               f"1 <= top_k <= model.num_experts={self.num_experts}")
        for key in ("intermediate_size", "num_layers"):
            _check(getattr(self, key) > 0, f"model.{key}", getattr(self, key), "> 0")


@dataclass
class LiveMetricsConfig:
    """Pathway metrics of a fixed probe set of training samples at every logging step."""

    enabled: bool = True
    samples_per_group: int = 64
    positions: list[Positions] = field(default_factory=lambda: [Positions.all, Positions.answer])

    def __post_init__(self) -> None:
        self.positions = [_choice(Positions, p, "train.live_metrics.positions") for p in self.positions]
        _check(self.samples_per_group > 0, "train.live_metrics.samples_per_group", self.samples_per_group, "> 0")


@dataclass
class ToyTrainConfig:
    max_steps: int = 900
    lr: float = 2e-3
    weight_decay: float = 1.5
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 0
    schedule: Schedule = Schedule.wsd
    decay_fraction: float = 0.3  # wsd: share of max_steps spent decaying at the end
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # 0 = off
    save_every: int = 50
    log_every: int = 25
    seed: int = 0
    num_threads: int = 2  # fixed, so a zoo is reproducible bit for bit on a machine; 0 = torch default
    live_metrics: LiveMetricsConfig = field(default_factory=LiveMetricsConfig)
    experts_implementation: str = "grouped_mm"
    attn_implementation: str = "eager"  # fastest for the toy's 5-9 token sequences on CPU

    def __post_init__(self) -> None:
        self.schedule = _choice(Schedule, self.schedule, "train.schedule")
        _check(self.lr > 0, "train.lr", self.lr, "> 0")
        _check(self.warmup_steps >= 0, "train.warmup_steps", self.warmup_steps, ">= 0")
        _check(0.0 <= self.decay_fraction <= 1.0, "train.decay_fraction", self.decay_fraction,
               "a number in [0, 1]")
        _check(self.max_steps > 0, "train.max_steps", self.max_steps, "> 0")
        _check(self.save_every > 0, "train.save_every", self.save_every, "> 0")
        _check(self.log_every > 0, "train.log_every", self.log_every, "> 0")


@dataclass
class PretrainToyConfig:
    out_dir: str = "zoo/default"
    data: ToyDataConfig = field(default_factory=ToyDataConfig)
    model: ToyModelConfig = field(default_factory=ToyModelConfig)
    train: ToyTrainConfig = field(default_factory=ToyTrainConfig)


# --------------------------------------------------------------------------- sweep


EXPERTS_IMPLEMENTATIONS = ("auto", "eager", "grouped_mm", "batched_mm", "fused", "fused_triton", "fused_vllm")


@dataclass
class ModelConfig:
    """How checkpoints are loaded (config group `model/`)."""

    dtype: Dtype = Dtype.auto
    attn_implementation: str = ""  # "" = what transformers chooses for the model; eager | sdpa | ...
    # auto: the fastest available (GPU: vLLM's fused MoE kernel, else moegrok's Triton kernel; CPU: what
    # transformers picks); eager | grouped_mm | batched_mm | fused | fused_triton | fused_vllm
    experts_implementation: str = "auto"
    trust_remote_code: bool = False
    # the embedding progress measure (MED) runs over the tokens "0".."residue_tokens-1"; 0 = off
    residue_tokens: int = 0
    # package.module:function returning a moegrok.routing.adapters.MoeAdapter, used for every checkpoint instead
    # of the built-in one (e.g. a family moegrok does not know); each record actor imports it by name.
    # "" = the built-in adapter of the model's family (moegrok/routing/families.py)
    adapter: str = ""

    def __post_init__(self) -> None:
        self.dtype = _choice(Dtype, self.dtype, "model.dtype")
        _check(self.experts_implementation in EXPERTS_IMPLEMENTATIONS, "model.experts_implementation",
               self.experts_implementation, "one of " + ", ".join(EXPERTS_IMPLEMENTATIONS))
        _check(self.residue_tokens >= 0, "model.residue_tokens", self.residue_tokens, ">= 0")
        module_name, _, function_name = self.adapter.partition(":")
        _check(not self.adapter or bool(module_name and function_name), "model.adapter", self.adapter,
               "package.module:function or empty")


@dataclass
class CheckpointsConfig:
    """The checkpoint catalog (config group `checkpoints/`)."""

    dir: str | None = None  # a local directory of checkpoint dirs
    pattern: str = "*"  # glob inside `dir`; of what matches, the directories with a checkpoint name
    paths: list[str] = field(default_factory=list)  # local dirs, repo@revision, fsspec URLs
    repo: str | None = None  # a Hugging Face repo whose revisions are the checkpoints
    revisions: list[str] = field(default_factory=list)  # empty: listed from the hub (online)
    step_regex: str | None = None  # named groups `step` and optional `tokens` (e.g. 20B)
    steps: dict[str, int] = field(default_factory=dict)  # explicit steps by checkpoint name
    min_step: int | None = None
    max_step: int | None = None
    every_nth: int = 1
    num_evenly_spaced: int = 0  # 0 = keep all
    cache_dir: str = ".cache/moegrok/checkpoints"  # where URL checkpoints are copied

    def __post_init__(self) -> None:
        _check(self.every_nth >= 1, "checkpoints.every_nth", self.every_nth, ">= 1")
        _check(self.num_evenly_spaced >= 0, "checkpoints.num_evenly_spaced", self.num_evenly_spaced, ">= 0")
        _check(self.min_step is None or self.max_step is None or self.min_step <= self.max_step,
               "checkpoints.max_step", self.max_step, f">= checkpoints.min_step={self.min_step}")


@dataclass
class SamplesConfig:
    """Training samples whose routing a sweep records (config group `samples/`)."""

    paths: list[str] = field(default_factory=list)  # jsonl / parquet with id, group, text | prompt+completion
    groups: list[str] = field(default_factory=list)  # empty = every group in the files
    max_per_group: int = 0  # 0 = all; else a seeded subsample per group
    max_tokens: int | None = None  # longer samples are cut to this; null = the model's context length
    truncation: TruncationPolicy = TruncationPolicy.report  # what a cut sample does: reported, or an error at start-up
    shard_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        self.truncation = _choice(TruncationPolicy, self.truncation, "samples.truncation")
        _check(self.shard_size > 0, "samples.shard_size", self.shard_size, "> 0")
        _check(self.max_tokens is None or self.max_tokens >= 2, "samples.max_tokens", self.max_tokens,
               ">= 2, or null (the model's context length)")
        _check(self.max_per_group >= 0, "samples.max_per_group", self.max_per_group, ">= 0 (0 = all)")


@dataclass
class RecordConfig:
    max_tokens_per_batch: int = 0  # 0 = auto: GPU from free memory and the model's shape; CPU 16384
    compile: bool | None = None  # torch.compile the decoder; null = on when a GPU is present, off on CPU
    loss_chunk_tokens: int = 4096
    keep_input_ids: bool = True  # the input_ids column (vocabulary specialization needs it)
    storage: Storage = Storage.tokens  # compact: a fraction of the bytes (docs/scale.md)
    token_samples_per_group: int = 64  # compact: samples per group that keep token-level routing
    num_actors: int = 1
    num_gpus: float = -1  # per actor; -1 = 1 when the cluster has GPUs, else 0
    num_cpus: float = 1
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor (node types)
    max_retries: int = 1  # retries of a failed unit before it goes to failures.parquet

    def __post_init__(self) -> None:
        self.storage = _choice(Storage, self.storage, "record.storage")
        _check(self.token_samples_per_group >= 0, "record.token_samples_per_group", self.token_samples_per_group,
               ">= 0")
        _check_workers("record", self)
        _check(self.max_tokens_per_batch >= 0, "record.max_tokens_per_batch", self.max_tokens_per_batch,
               ">= 0 (0 = auto)")
        _check(self.loss_chunk_tokens > 0, "record.loss_chunk_tokens", self.loss_chunk_tokens, "> 0")


def _check_workers(section: str, cfg: RecordConfig | EvalConfig | TuneConfig) -> None:
    """The actor settings that record, evaluate and tune share."""
    _check(cfg.num_actors >= 1, f"{section}.num_actors", cfg.num_actors, ">= 1")
    _check(cfg.num_gpus >= 0 or cfg.num_gpus == -1, f"{section}.num_gpus", cfg.num_gpus, ">= 0, or -1 (auto)")
    _check(cfg.num_cpus >= 0, f"{section}.num_cpus", cfg.num_cpus, ">= 0")
    _check(cfg.max_retries >= 0, f"{section}.max_retries", cfg.max_retries, ">= 0")
    _check(all(amount >= 0 for amount in cfg.resources.values()), f"{section}.resources", cfg.resources,
           "amounts >= 0")


@dataclass
class MemorizationConfig:
    delta: float = 0.05
    eps: float | None = None  # fixed eps; None = per group, to reach target_fraction
    target_fraction: float = 0.2

    def __post_init__(self) -> None:
        _check(self.delta >= 0, "metrics.memorization.delta", self.delta, ">= 0")
        _check(self.eps is None or self.eps > 0, "metrics.memorization.eps", self.eps, "> 0, or null")
        _check(0.0 < self.target_fraction <= 1.0, "metrics.memorization.target_fraction", self.target_fraction,
               "a number in (0, 1]")


@dataclass
class RoutingAnalysesConfig:
    """The OLMoE paper's routing analyses (saturation, co-activation, specialization, load)."""

    enabled: bool = True
    # saturation is always measured against the previous checkpoint (a monitor); and against this
    # one: "last" (the paper's form; retrospective), a checkpoint name, or "none"
    saturation_reference: str = "last"
    vocab_min_count: int = 10  # token ids seen fewer times are left out of vocabulary specialization

    def __post_init__(self) -> None:
        _check(self.vocab_min_count >= 1, "metrics.routing_analyses.vocab_min_count", self.vocab_min_count, ">= 1")


@dataclass
class MetricsConfig:
    # a pathway keeps a layer's top-ranked experts until their cumulative share of the layer's
    # routing weight first exceeds this share
    weight_share: float = 0.7
    # token positions a pathway averages over: all (the paper) | answer (positions predicting a
    # scored token). Each extra entry adds its metric columns with the suffix _<positions>.
    positions: list[Positions] = field(default_factory=lambda: [Positions.all])
    max_pairs: int = 2_000_000  # exact all pairs up to this many, then a seeded sample of pairs
    seed: int = 0
    # metrics of all samples, and of the samples memorized by each checkpoint (the paper's loss
    # rule: retrospective, it needs the last checkpoint, so a new checkpoint recomputes them)
    sample_sets: list[SampleSet] = field(default_factory=lambda: [SampleSet.all, SampleSet.memorized])
    routing_analyses: RoutingAnalysesConfig = field(default_factory=RoutingAnalysesConfig)
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)

    def __post_init__(self) -> None:
        _check(0.0 < self.weight_share < 1.0, "metrics.weight_share", self.weight_share, "a number in (0, 1)")
        self.positions = [_choice(Positions, p, "metrics.positions") for p in self.positions]
        self.sample_sets = [_choice(SampleSet, s, "metrics.sample_sets") for s in self.sample_sets]
        _check(SampleSet.all in self.sample_sets, "metrics.sample_sets", self.sample_sets, "a list with all")
        _check(len(self.positions) > 0 and len(set(self.positions)) == len(self.positions), "metrics.positions",
               self.positions, "a non-empty list of distinct positions")
        _check(self.max_pairs > 0, "metrics.max_pairs", self.max_pairs, "> 0")


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    path: str = MISSING  # jsonl items, or an lm-eval task YAML with a local dataset
    group_field: str | None = None  # lm-eval: the document field that is an item's group (else the task's tag)
    id_field: str = "id"  # lm-eval: the document field that is an item's id (else its index)


@dataclass
class EvalConfig:
    """Downstream benchmarks (config group `eval/`)."""

    enabled: bool = True
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    engine: Engine = Engine.auto
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    # greedy generation length of moegrok jsonl items; null = per benchmark, the longest tokenized
    # exact answer + 4 tokens (code items: 256). lm-eval tasks use their own generation_kwargs.
    max_new_tokens: int | None = None
    max_items: int = 0  # 0 = all items of each benchmark
    batch_size: int = 64  # HF engine
    num_actors: int = 1
    num_gpus: float = -1  # per actor; -1 = tensor_parallel_size when the cluster has GPUs, else 0
    num_cpus: float = 1
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor (node types)
    code_timeout_s: float = 10.0
    sandbox: Sandbox = Sandbox.isolated  # code benchmarks: `unisolated` runs them without bubblewrap
    max_retries: int = 1

    def __post_init__(self) -> None:
        self.engine = _choice(Engine, self.engine, "eval.engine")
        self.sandbox = _choice(Sandbox, self.sandbox, "eval.sandbox")
        _check_workers("eval", self)
        _check(self.tensor_parallel_size >= 1, "eval.tensor_parallel_size", self.tensor_parallel_size, ">= 1")
        _check(0.0 < self.gpu_memory_utilization <= 1.0, "eval.gpu_memory_utilization",
               self.gpu_memory_utilization, "a number in (0, 1]")
        _check(self.max_new_tokens is None or self.max_new_tokens >= 1, "eval.max_new_tokens", self.max_new_tokens,
               ">= 1, or null (from the benchmark's answers)")
        _check(self.max_items >= 0, "eval.max_items", self.max_items, ">= 0 (0 = all)")
        _check(self.batch_size >= 1, "eval.batch_size", self.batch_size, ">= 1")
        _check(self.code_timeout_s > 0, "eval.code_timeout_s", self.code_timeout_s, "> 0")
        names = [b.name for b in self.benchmarks]
        _check(len(set(names)) == len(names), "eval.benchmarks", names, "unique benchmark names")


@dataclass
class TuneConfig:
    """Optional LoRA instruction tuning of every checkpoint before evaluation (group `tune/`)."""

    enabled: bool = False
    method: TuneMethod = TuneMethod.lora
    data: str | None = None  # jsonl with prompt, completion; None = the sweep's prompt/completion samples
    max_examples: int = 0  # 0 = all
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj"])
    rank: int = 32
    alpha: int = 64
    dropout: float = 0.05
    lr: float = 5e-5
    epochs: int = 3
    batch_size: int = 8
    max_length: int = 512
    seed: int = 0
    num_actors: int = 1
    num_gpus: float = -1  # per actor; -1 = 1 when the cluster has GPUs, else 0
    num_cpus: float = 1
    resources: dict[str, float] = field(default_factory=dict)  # custom Ray resources per actor (node types)
    max_retries: int = 1

    def __post_init__(self) -> None:
        self.method = _choice(TuneMethod, self.method, "tune.method")
        _check_workers("tune", self)
        _check(self.rank > 0, "tune.rank", self.rank, "> 0")
        _check(self.epochs > 0, "tune.epochs", self.epochs, "> 0")
        _check(self.lr > 0, "tune.lr", self.lr, "> 0")
        _check(self.batch_size >= 1, "tune.batch_size", self.batch_size, ">= 1")
        _check(self.max_length >= 2, "tune.max_length", self.max_length, ">= 2")
        _check(0.0 <= self.dropout < 1.0, "tune.dropout", self.dropout, "a number in [0, 1)")


@dataclass
class AnalysisConfig:
    group_map: dict[str, str] = field(default_factory=dict)  # training group -> benchmark group
    # all samples: the memorized set is retrospective (its loss rule looks at the last checkpoint)
    sample_set: SampleSet = SampleSet.all
    min_rise: float = 0.1  # accuracy onset: the rise that counts as generalization
    memorized_accuracy: float = 0.99  # train accuracy at which a group counts as memorized
    min_n: int = 8  # no correlation from fewer checkpoints
    # the between-group contrast: a group known not to generalize (null: the other groups' mean)
    control: str | None = None
    num_draws: int = 200  # bootstrap draws over samples for the contrast's intervals

    def __post_init__(self) -> None:
        self.sample_set = _choice(SampleSet, self.sample_set, "analysis.sample_set")
        _check(0.0 < self.min_rise <= 1.0, "analysis.min_rise", self.min_rise, "a number in (0, 1]")
        _check(0.0 < self.memorized_accuracy <= 1.0, "analysis.memorized_accuracy", self.memorized_accuracy,
               "a number in (0, 1]")
        _check(self.min_n >= 4, "analysis.min_n", self.min_n, ">= 4")
        _check(self.num_draws >= 20, "analysis.num_draws", self.num_draws, ">= 20")
        _check(self.control is None or bool(self.control), "analysis.control", self.control,
               "a group name or null")


# Ray's job supervisor sets this for the entrypoint of `ray job submit` (with RAY_ADDRESS)
RAY_JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"


def ray_address(address: str | None) -> str:
    """The Ray address a sweep uses: `cluster.address` when set ("auto", "host:port",
    "ray://host:10001"); unset, the job's cluster for a driver started by `ray job submit`
    ("auto", which reads RAY_ADDRESS), else "local" (a new Ray instance of our own)."""
    if address:
        return address
    return "auto" if RAY_JOB_ENV in os.environ else "local"


@dataclass
class ClusterConfig:
    """Where Ray runs (config group `cluster/`)."""

    address: str | None = None  # None: a local Ray of our own (in a Ray job: the job's cluster); "auto": join
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only
    sync_uri: str | None = None  # fsspec URL a local run dir is copied to at the end of the sweep
    connect_timeout_s: float = 30.0  # joining a cluster that does not answer by then is an error

    def __post_init__(self) -> None:
        _check(self.num_cpus is None or self.num_cpus >= 1, "cluster.num_cpus", self.num_cpus, ">= 1, or null")
        _check(self.num_gpus is None or self.num_gpus >= 0, "cluster.num_gpus", self.num_gpus, ">= 0, or null")
        _check(self.connect_timeout_s > 0, "cluster.connect_timeout_s", self.connect_timeout_s, "> 0")


@dataclass
class StorageConfig:
    """How an object-store run_dir (s3://, gs://, any fsspec URL) and URL inputs are reached."""

    # fsspec-style options: endpoint_url, key, secret, token, region; unset: the AWS_* variables
    # (or the node's instance role); gs:// passes them to gcsfs
    options: dict[str, Any] = field(default_factory=dict)
    lease_ttl_s: float = 120.0  # a crashed sweep's lease on the run dir expires after this long

    def __post_init__(self) -> None:
        _check(self.lease_ttl_s >= 3, "storage.lease_ttl_s", self.lease_ttl_s, ">= 3 (it is renewed every ttl/3)")


@dataclass
class WatchConfig:
    """Follow a pretraining run: sweep the checkpoints that are complete, wait, sweep again."""

    enabled: bool = False
    poll_s: float = 60.0  # wait between sweeps
    timeout_s: float = 0.0  # stop after this long; 0 = only at the sentinel
    sentinel: str = ""  # a file (relative to checkpoints.dir, or absolute) whose appearance ends the watch

    def __post_init__(self) -> None:
        _check(self.poll_s > 0, "watch.poll_s", self.poll_s, "> 0")
        _check(self.timeout_s >= 0, "watch.timeout_s", self.timeout_s, ">= 0 (0 = no timeout)")


@dataclass
class SweepConfig:
    run_dir: str = MISSING
    stage: Stage = Stage.all
    progress: bool = True
    model: ModelConfig = field(default_factory=ModelConfig)
    checkpoints: CheckpointsConfig = field(default_factory=CheckpointsConfig)
    samples: SamplesConfig = field(default_factory=SamplesConfig)
    record: RecordConfig = field(default_factory=RecordConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    analysis: AnalysisConfig = field(default_factory=AnalysisConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    watch: WatchConfig = field(default_factory=WatchConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)

    def __post_init__(self) -> None:
        self.stage = _choice(Stage, self.stage, "stage")
        url_run = isinstance(self.run_dir, str) and "://" in self.run_dir and not self.run_dir.startswith("file://")
        _check(not (url_run and self.cluster.sync_uri), "cluster.sync_uri", self.cluster.sync_uri,
               f"null when run_dir={self.run_dir!r} is already on object storage (sync_uri copies a local run)")
        _check(self.analysis.sample_set in self.metrics.sample_sets, "analysis.sample_set", self.analysis.sample_set,
               f"one of metrics.sample_sets={[str(s) for s in self.metrics.sample_sets]}")
        _check(not self.watch.enabled or bool(self.watch.sentinel or self.watch.timeout_s), "watch",
               self.watch, "a watch.sentinel or a watch.timeout_s, or it never ends")


# --------------------------------------------------------------------------- study


class ZooRole(StrEnum):
    # informational only: every zoo is evaluated with the rules calibrated on all the others
    calibration = "calibration"
    evaluation = "evaluation"


@dataclass
class StudyZooConfig:
    name: str = MISSING
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted pretrain_toy keys
    role: ZooRole = ZooRole.evaluation
    dir: str | None = None  # a zoo trained elsewhere: swept as it is, never trained (seeds: just [0])

    def __post_init__(self) -> None:
        self.role = _choice(ZooRole, self.role, f"zoos[{self.name}].role")
        _check(len(self.seeds) > 0, f"zoos[{self.name}].seeds", self.seeds, "at least one seed")
        _check(self.dir is None or (self.seeds == [0] and not self.overrides), f"zoos[{self.name}].dir", self.dir,
               "no seeds or overrides beside it (the zoo is already trained)")


@dataclass
class DetectorConfig:
    """The detector's calibration grid and cost (moegrok/analysis/calibration.py)."""

    z_thresholds: list[float] = field(
        default_factory=lambda: [1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0])  # z units
    persistence: list[int] = field(default_factory=lambda: [1, 2, 3])
    # a training-loss rise (nats) above its running minimum since memorization
    spike_loss_rises: list[float] = field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5, 1.0, 2.0])
    miss_cost: float = 300.0  # steps charged for a miss or a false alarm (the main table)
    miss_costs: list[float] = field(default_factory=lambda: [100.0, 200.0, 300.0, 400.0, 600.0])  # sensitivity
    bootstrap_draws: int = 2000  # draws over scored groups for every cost's and difference's interval

    def __post_init__(self) -> None:
        for key in ("z_thresholds", "spike_loss_rises"):
            values = getattr(self, key)
            _check(len(values) > 0 and all(v > 0 for v in values), f"detector.{key}", values,
                   "a non-empty list of numbers > 0")
        _check(len(self.persistence) > 0 and all(m >= 1 for m in self.persistence), "detector.persistence",
               self.persistence, "a non-empty list of integers >= 1")
        _check(self.miss_cost > 0, "detector.miss_cost", self.miss_cost, "> 0")
        _check(len(self.miss_costs) > 0 and all(c > 0 for c in self.miss_costs), "detector.miss_costs",
               self.miss_costs, "a non-empty list of numbers > 0")
        _check(self.bootstrap_draws >= 100, "detector.bootstrap_draws", self.bootstrap_draws, ">= 100")


@dataclass
class StudyConfig:
    """Toy zoos trained and swept end to end; contrast and detector across them (jobs/study.py)."""

    out_dir: str = "runs/study"
    zoo_dir: str = "zoo/study"
    progress: bool = True
    base: PretrainToyConfig = field(default_factory=PretrainToyConfig)
    zoos: list[StudyZooConfig] = field(default_factory=list)
    extra_zoos: list[StudyZooConfig] = field(default_factory=list)  # trained elsewhere: each needs a `dir`
    control: str | None = None  # analysis.control of every sweep
    num_draws: int = 200  # analysis.num_draws of every sweep
    weight_shares: list[float] = field(default_factory=lambda: [0.7])  # metrics.weight_share of the correlation rows
    samples_per_group: int = 100
    eval_engine: Engine = Engine.hf
    eval_items: int = 600
    detector: DetectorConfig = field(default_factory=DetectorConfig)
    # where the small result tables go (CSV); the Markdown beside it (<findings_dir>.md) gets its
    # tables re-rendered between markers. null: none written
    findings_dir: str | None = None
    render_only: bool = False  # re-render <findings_dir>.md from the CSVs alone: no training, no sweep

    def __post_init__(self) -> None:
        _check(not self.render_only or bool(self.findings_dir), "render_only", self.render_only,
               "false unless findings_dir is set")
        self.eval_engine = _choice(Engine, self.eval_engine, "eval_engine")
        _check(all(z.dir for z in self.extra_zoos), "extra_zoos", [z.name for z in self.extra_zoos if not z.dir],
               "a dir for every extra zoo (a zoo trained elsewhere)")
        keys = [(z.name, seed) for z in [*self.zoos, *self.extra_zoos] for seed in z.seeds]
        _check(len(set(keys)) == len(keys), "zoos", keys, "unique (name, seed) pairs")
        _check(len(keys) != 1, "zoos", keys, "at least two zoos (each is calibrated on the others)")
        _check(all(0.0 < t < 1.0 for t in self.weight_shares) and self.weight_shares, "weight_shares",
               self.weight_shares, "a non-empty list of numbers in (0, 1)")
        _check(self.samples_per_group > 0, "samples_per_group", self.samples_per_group, "> 0")
        _check(self.eval_items >= 0, "eval_items", self.eval_items, ">= 0 (0 = all)")
        _check(self.num_draws >= 20, "num_draws", self.num_draws, ">= 20")


# --------------------------------------------------------------------------- registration


CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def compose_config(config_name: str, overrides: list[str]) -> Any:
    """A job's config (`conf/<config_name>.yaml`) as Hydra composes it with these command-line
    overrides, as its dataclass: the way the study and the tests build a sweep's config. Inside a
    running Hydra job it uses that job's search path; else conf/ beside this package."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    register_configs()
    if GlobalHydra.instance().is_initialized():
        return OmegaConf.to_object(compose(config_name=config_name, overrides=overrides))
    if not CONF_DIR.is_dir():
        raise ConfigError(f"no config directory at {CONF_DIR}: moegrok's conf/ is found beside its package "
                          "(run from a checkout, or `pip install -e .`)")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        return OmegaConf.to_object(compose(config_name=config_name, overrides=overrides))


RENAMED_KEYS = {  # keys of earlier versions, named in the error when a command line still uses them
    "metrics.threshold": "metrics.weight_share", "metrics.saturation_reference":
    "metrics.routing_analyses.saturation_reference", "metrics.vocab_min_count":
    "metrics.routing_analyses.vocab_min_count", "analysis.bootstrap": "analysis.num_draws",
}


def _flat_keys(node: Any, prefix: str = "") -> list[str]:
    keys = []
    for key, value in node.items() if isinstance(node, dict) else ():
        keys.append(prefix + str(key))
        keys += _flat_keys(value, f"{prefix}{key}.")
    return keys


def _first_of_sweeps(overrides: list[str]) -> list[str]:
    """The overrides with every sweep (`--multirun a=1,2`) at its first value; hydra's own keys left
    out. Raises ConfigError for an override Hydra cannot read."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException as e:
        raise ConfigError(f"cannot read the command line: {str(e).splitlines()[0]} (quote values with brackets, "
                          "braces or spaces for the shell)") from None
    out = []
    for override, text in zip(parsed, overrides, strict=True):
        if override.key_or_group.startswith("hydra"):
            continue
        if override.is_sweep_override():
            key = text.split("=", 1)[0]
            out.append(f"{key}={next(iter(override.sweep_string_iterator()))}")
        else:
            out.append(text)
    return out


def check_overrides(config_name: str, overrides: list[str]) -> None:
    """Compose the job's config as Hydra will (each sweep at its first value) and turn what Hydra
    rejects into one ConfigError line naming the key: an unknown key (with the nearest valid one),
    a value of the wrong type, a group option or experiment that does not exist."""
    import difflib

    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException, MissingConfigException
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigAttributeError, ConfigKeyError, ValidationError

    register_configs()
    overrides = _first_of_sweeps(overrides)
    for text in overrides:  # `optional experiment` would let a misspelt experiment pass silently
        group, _, option = text.partition("=")
        if "." not in group and (CONF_DIR / group.lstrip("+~")).is_dir() and option not in ("", "null"):
            options = sorted(p.stem for p in (CONF_DIR / group.lstrip("+~")).glob("*.yaml"))
            if option not in options:
                raise ConfigError(f"config group {group}={option!r}: no such option (options: {', '.join(options)})")
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        try:
            cfg = compose(config_name=config_name, overrides=overrides)
        except MissingConfigException as e:
            raise ConfigError(f"{' '.join(str(e).split()[:8])}: see conf/ for the options") from None
        except ConfigCompositionException as e:
            cause = e.__cause__
            key = getattr(cause, "full_key", None) or "?"
            if isinstance(cause, ConfigAttributeError | ConfigKeyError):
                if key in RENAMED_KEYS:
                    raise ConfigError(f"config key {key}: no such key; it is {RENAMED_KEYS[key]} now") from None
                parent, _, leaf = key.rpartition(".")
                siblings = [k.rpartition(".")[2] for k in _flat_keys(OmegaConf.to_container(
                    compose(config_name=config_name), resolve=False)) if k.rpartition(".")[0] == parent]
                near = difflib.get_close_matches(leaf, siblings, n=1, cutoff=0.6)
                hint = f"; did you mean {parent + '.' if parent else ''}{near[0]}?" if near else ""
                raise ConfigError(f"config key {key}: no such key{hint}") from None
            if isinstance(cause, ValidationError):
                raise ConfigError(f"config key {key}: {str(cause).splitlines()[0]}") from None
            raise ConfigError(" ".join(str(e).split())) from None
    OmegaConf.to_object(cfg)  # the schemas' own checks (each a ConfigError naming its key)


def command_line(argv: list[str], *, config_name: str) -> tuple[str, list[str]]:
    """(config name, overrides) of a Hydra job's command line: its flags (`--multirun`,
    `--config-name X`, `--cfg job`, ...) left out."""
    overrides, name, skip = [], config_name, False
    for index, arg in enumerate(argv):
        if skip:
            skip = False
            continue
        if arg in ("--config-name", "-cn"):
            name, skip = argv[index + 1] if index + 1 < len(argv) else name, True
        elif arg.startswith("--config-name="):
            name = arg.split("=", 1)[1]
        elif arg in ("--cfg", "-c", "--config-path", "-cp", "--config-dir", "-cd", "--package", "-p",
                     "--experimental-rerun"):
            skip = True
        elif not arg.startswith("-"):
            overrides.append(arg)
    return name, overrides


def check_command_line(argv: list[str], *, config_name: str) -> int:
    """A job's command line checked before Hydra runs it: 0, or 2 after one line on stderr (what
    Hydra itself would report in several lines with a traceback hint)."""
    from moegrok.errors import exit_status

    name, overrides = command_line(argv, config_name=config_name)
    return exit_status(lambda: check_overrides(name, overrides) or 0)


def register_configs() -> None:
    """Register the schemas with Hydra so that a typo'd key fails at start-up."""
    from hydra.core.config_store import ConfigStore
    from omegaconf import OmegaConf

    # conf/hydra/launcher/ray_grid.yaml starts Ray where a single sweep would
    OmegaConf.register_new_resolver("ray_address", ray_address, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="pretrain_toy_schema", node=PretrainToyConfig)
    cs.store(name="sweep_schema", node=SweepConfig)
    cs.store(name="study_schema", node=StudyConfig)
