"""Dataclass schemas for every config group, registered in Hydra's ConfigStore.

Jobs convert their DictConfig with `OmegaConf.to_object`, so `__post_init__` validation runs
at start-up and the library only ever sees these dataclasses. Errors name the config key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

MISSING = "???"


def _check(ok: bool, key: str, value: object, expected: str) -> None:
    if not ok:
        raise ValueError(f"config key {key}={value!r}: expected {expected}")


# --------------------------------------------------------------------------- toy zoo


@dataclass
class ToyGroupConfig:
    name: str = MISSING
    op: str = MISSING  # one of moegrok.toy.data.OPERATIONS
    train_fraction: float = 0.5


@dataclass
class ToyDataConfig:
    p: int = 47
    groups: list[ToyGroupConfig] = field(
        default_factory=lambda: [
            ToyGroupConfig("add", "add", 0.7),
            ToyGroupConfig("sub", "sub", 0.5),
            ToyGroupConfig("mul", "mul", 0.1),  # memorizes, never generalizes: a negative control
        ]
    )
    seed: int = 0

    def __post_init__(self) -> None:
        from moegrok.toy.data import OPERATIONS, is_prime

        _check(is_prime(self.p), "data.p", self.p, "a prime number")
        _check(len(self.groups) > 0, "data.groups", self.groups, "at least one group")
        names = [g.name for g in self.groups]
        _check(len(set(names)) == len(names), "data.groups", names, "unique group names")
        for i, group in enumerate(self.groups):
            key = f"data.groups[{i}]"
            _check(group.op in OPERATIONS, f"{key}.op", group.op, f"one of {sorted(OPERATIONS)}")
            frac = group.train_fraction
            _check(0.0 < frac < 1.0, f"{key}.train_fraction", frac, "a number in (0, 1)")


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


@dataclass
class ToyTrainConfig:
    max_steps: int = 900
    lr: float = 2e-3
    weight_decay: float = 1.5
    beta1: float = 0.9
    beta2: float = 0.98
    warmup_steps: int = 0
    schedule: str = "wsd"  # constant | cosine | wsd (warmup, stable, then linear decay)
    decay_fraction: float = 0.3  # wsd: share of max_steps spent decaying at the end
    min_lr_ratio: float = 0.1
    grad_clip: float = 0.0  # 0 = off
    save_every: int = 50
    log_every: int = 25
    seed: int = 0
    num_threads: int = 2  # fixed, so a zoo is reproducible bit for bit on a machine; 0 = torch default
    # live pathway metrics of a fixed probe set of training samples at every logging step
    monitor_samples_per_group: int = 64  # 0 = off
    monitor_positions: list[str] = field(default_factory=lambda: ["all", "answer"])
    experts_implementation: str = "grouped_mm"
    attn_implementation: str = "eager"  # fastest for the toy's 5-9 token sequences on CPU

    def __post_init__(self) -> None:
        _check(self.schedule in ("constant", "cosine", "wsd"), "train.schedule", self.schedule,
               "constant, cosine or wsd")
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


# --------------------------------------------------------------------------- monitor sweep


@dataclass
class ModelConfig:
    """How checkpoints are loaded (config group `model/`)."""

    dtype: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | float32 | bfloat16 | float16
    attn_implementation: str = ""  # "" = what transformers chooses for the model; eager | sdpa | ...
    experts_implementation: str = ""  # "" = the transformers default; eager | grouped_mm | ...
    trust_remote_code: bool = False
    # the embedding progress measure (MED) runs over the tokens "0".."residue_tokens-1"; 0 = off
    residue_tokens: int = 0
    # package.module:function returning a moegrok.adapters.MoeAdapter, used for every checkpoint instead
    # of the built-in one (e.g. a family moegrok does not know); each record actor imports it by name.
    # "" = the built-in adapter of the model's family (moegrok/families.py)
    adapter: str = ""

    def __post_init__(self) -> None:
        _check(self.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype", self.dtype,
               "auto, float32, bfloat16 or float16")
        module_name, _, function_name = self.adapter.partition(":")
        _check(not self.adapter or bool(module_name and function_name), "model.adapter", self.adapter,
               "package.module:function or empty")


@dataclass
class CheckpointsConfig:
    """The checkpoint catalog (config group `checkpoints/`)."""

    dir: str | None = None  # a local directory of checkpoint dirs
    pattern: str = "step*"  # glob inside `dir`
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


@dataclass
class SamplesConfig:
    """Training samples to monitor (config group `samples/`)."""

    paths: list[str] = field(default_factory=list)  # jsonl / parquet with id, group, text | prompt+completion
    groups: list[str] = field(default_factory=list)  # empty = every group in the files
    max_per_group: int = 0  # 0 = all; else a seeded subsample per group
    max_tokens: int = 512
    shard_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        _check(self.shard_size > 0, "samples.shard_size", self.shard_size, "> 0")
        _check(self.max_tokens >= 2, "samples.max_tokens", self.max_tokens, ">= 2")


@dataclass
class RecordConfig:
    max_tokens_per_batch: int = 16384
    loss_chunk_tokens: int = 4096
    keep_input_ids: bool = True  # the input_ids column (vocabulary specialization needs it)
    num_actors: int = 1
    num_gpus: float = -1  # per actor; -1 = 1 when the cluster has GPUs, else 0
    num_cpus: float = 1
    max_retries: int = 1  # retries of a failed unit before it goes to failures.parquet


@dataclass
class MemorizationConfig:
    delta: float = 0.05
    eps: float | None = None  # fixed eps; None = per group, to reach target_fraction
    target_fraction: float = 0.2


@dataclass
class MetricsConfig:
    threshold: float = 0.7  # cumulative routing-weight share kept in a pathway
    # token positions a pathway averages over: all (the paper) | answer (positions predicting a
    # scored token). Each extra entry adds its metric columns with the suffix _<positions>.
    positions: list[str] = field(default_factory=lambda: ["all"])
    max_pairs: int = 2_000_000  # exact all pairs up to this many, then a seeded sample of pairs
    seed: int = 0
    write_sample_metrics: bool = True  # per-sample pathways and consistency, sample_metrics.parquet
    # the OLMoE paper's routing analyses (saturation, co-activation, specialization, load)
    routing_analyses: bool = True
    saturation_reference: str | None = None  # checkpoint name; None = the last one
    vocab_min_count: int = 10  # token ids seen fewer times are left out of vocabulary specialization
    memorization: MemorizationConfig = field(default_factory=MemorizationConfig)

    def __post_init__(self) -> None:
        _check(0.0 < self.threshold < 1.0, "metrics.threshold", self.threshold, "a number in (0, 1)")
        _check(len(self.positions) > 0 and set(self.positions) <= {"all", "answer"}, "metrics.positions",
               self.positions, "a non-empty list of: all, answer")
        _check(self.max_pairs > 0, "metrics.max_pairs", self.max_pairs, "> 0")


@dataclass
class BenchmarkConfig:
    name: str = MISSING
    path: str = MISSING  # jsonl items, or an lm-eval task YAML with a local dataset


@dataclass
class EvalConfig:
    """Downstream benchmarks (config group `eval/`)."""

    enabled: bool = True
    benchmarks: list[BenchmarkConfig] = field(default_factory=list)
    engine: str = "auto"  # auto (vllm when the cluster has GPUs, else hf) | vllm | hf
    tensor_parallel_size: int = 1
    gpu_memory_utilization: float = 0.85
    max_new_tokens: int = 16
    max_items: int = 0  # 0 = all items of each benchmark
    batch_size: int = 64  # HF engine
    num_actors: int = 1
    num_gpus: float = -1  # per actor; -1 = tensor_parallel_size when the cluster has GPUs, else 0
    num_cpus: float = 1
    code_timeout_s: float = 10.0
    max_retries: int = 1

    def __post_init__(self) -> None:
        _check(self.engine in ("auto", "vllm", "hf"), "eval.engine", self.engine, "auto, vllm or hf")


@dataclass
class TuneConfig:
    """Optional LoRA instruction tuning of every checkpoint before evaluation (group `tune/`)."""

    method: str = "none"  # none | lora
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
    max_retries: int = 1

    def __post_init__(self) -> None:
        _check(self.method in ("none", "lora"), "tune.method", self.method, "none or lora")
        _check(self.rank > 0, "tune.rank", self.rank, "> 0")
        _check(self.epochs > 0, "tune.epochs", self.epochs, "> 0")


@dataclass
class AnalysisConfig:
    group_map: dict[str, str] = field(default_factory=dict)  # training group -> benchmark group
    sample_set: str = "memorized"  # memorized | all
    min_rise: float = 0.1  # accuracy onset: the rise that counts as generalization
    memorized_accuracy: float = 0.99  # train accuracy at which a group counts as memorized

    def __post_init__(self) -> None:
        _check(self.sample_set in ("memorized", "all"), "analysis.sample_set", self.sample_set,
               "memorized or all")


@dataclass
class ClusterConfig:
    """Where Ray runs (config group `cluster/`)."""

    address: str | None = None  # None: start a local Ray; "auto": join the running cluster
    num_cpus: int | None = None  # local Ray only
    num_gpus: int | None = None  # local Ray only
    sync_uri: str | None = None  # fsspec URL the run dir is copied to after each stage


STAGES = ("all", "record", "reduce", "tune", "evaluate", "analyze", "report")


@dataclass
class MonitorConfig:
    run_dir: str = MISSING
    stage: str = "all"  # all | record | reduce | tune | evaluate | analyze | report
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

    def __post_init__(self) -> None:
        _check(self.stage in STAGES, "stage", self.stage, f"one of {STAGES}")


# --------------------------------------------------------------------------- study


@dataclass
class StudyVariantConfig:
    name: str = MISSING
    seeds: list[int] = field(default_factory=lambda: [0])
    overrides: dict[str, Any] = field(default_factory=dict)  # dotted pretrain_toy keys


@dataclass
class StudyConfig:
    """Toy-zoo variants trained and swept end to end (jobs/study.py)."""

    out_dir: str = "runs/study"
    zoo_dir: str = "zoo/study"
    progress: bool = True
    base: PretrainToyConfig = field(default_factory=PretrainToyConfig)
    variants: list[StudyVariantConfig] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=lambda: [0.5, 0.7, 0.8])
    sample_sets: list[str] = field(default_factory=lambda: ["memorized", "all"])
    samples_per_group: int = 100
    eval_engine: str = "hf"
    eval_items: int = 600
    best_variant_seeds: list[int] = field(default_factory=lambda: [1, 2])
    target: float = 0.95


# --------------------------------------------------------------------------- registration


def register_configs() -> None:
    """Register the schemas with Hydra so that a typo'd key fails at start-up."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="pretrain_toy_schema", node=PretrainToyConfig)
    cs.store(name="monitor_schema", node=MonitorConfig)
    cs.store(name="study_schema", node=StudyConfig)
