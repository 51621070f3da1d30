"""Typed schema of a prefopt recipe.

A recipe is a YAML file whose sections map onto these dataclasses. `prefopt.config.load_recipe`
merges a recipe with its ``base:`` recipes and ``key=value`` overrides, checks every key against
this schema (suggesting the closest valid key for a typo), and returns a :class:`Recipe`.

The ``objective`` section is checked against the parameter dataclass that the chosen objective
registers (see ``prefopt.objectives``), so ``objective.gamma`` is valid for SimPO but an error
for DPO.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


@dataclass
class LoraConfig:
    """LoRA adapters (Hu et al. 2021) through peft on every learner's model; the base weights stay frozen.
    The reference is the same model with its adapters disabled."""
    r: int = 8
    alpha: float = 16.0                      # scaling alpha / r
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj",
                                                               "gate_proj", "up_proj", "down_proj"])
    modules_to_save: list[str] = field(default_factory=list)   # trained fully (a reward or value head always is)


@dataclass
class ModelConfig:
    # A local HF checkpoint directory, a hub name (needs network), or "builtin:tiny-llama"
    # (a tiny Llama-family model + tokenizer built offline; used by tests, demo and benchmarks).
    path: str = MISSING
    tokenizer: Optional[str] = None          # defaults to `path`
    trust_remote_code: bool = False          # secure default: never run code shipped with a checkpoint
    attn_implementation: str = "sdpa"        # "sdpa" | "eager" | "flash_attention_2"
    gradient_checkpointing: bool = False
    padding_free: bool = True                # policy/reference/critic forwards pack the non-pad tokens of a
                                             # micro-batch into one row (no pad FLOPs; models/packing.py)
    share_prompts: bool = True               # with padding_free and sdpa: rows with the same prompt (a pair,
                                             # a list, a rollout group) share one copy of it in the packed row
    lora: Optional[LoraConfig] = None        # LoRA adapters instead of full fine-tuning (null: full)


@dataclass
class SyntheticDataConfig:
    """Parameters of the synthetic, learnable data (data.path: synthetic:pairs|lists|sft|attributes|steps|reverse)."""
    num_rows: int = 1024
    list_size: int = 4        # responses per prompt for synthetic:lists
    words: int = 4            # words to reverse per row of synthetic:reverse (a task with a verifiable answer)
    seed: int = 0


@dataclass
class DataConfig:
    # A local .jsonl/.json/.parquet file (or a directory of them), a `datasets` name, or
    # "synthetic:pairs" / "synthetic:lists" / "synthetic:sft" (generated offline into the cache).
    path: str = MISSING
    split: str = "train"
    eval_path: Optional[str] = None          # held-out data; default: a split of `path`
    eval_split: Optional[str] = None
    eval_fraction: float = 0.1               # held-out fraction when eval_path is not given
    max_eval_examples: int = 512
    max_length: int = 512                    # prompt + response tokens, per response
    max_prompt_length: int = 256             # prompts are truncated first (their start is dropped)
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    responses_field: str = "responses"       # listwise rows: {prompt, responses: [...], scores: [...]}
    scores_field: str = "scores"
    response_field: str = "response"         # SFT rows: {prompt, response}, or
    messages_field: str = "messages"         # {messages: [...]} (a conversation; the last message is the response)
    # reward-model rows: pairs may carry a margin; {prompt, response, attributes: {name: rating}}
    # (multi-attribute regression); {prompt, steps: [...], labels: [...]} (process reward models)
    margin_field: str = "margin"
    weight_field: str = "weight"             # pairs: an optional per-row weight of the row's loss
    attributes_field: str = "attributes"
    steps_field: str = "steps"
    labels_field: str = "labels"
    step_delimiter: str = "\n"              # written after every step (the PRM reads each step's last token)
    on_error: str = "raise"                  # "raise" | "skip" (drop and count malformed rows)
    synthetic: SyntheticDataConfig = field(default_factory=SyntheticDataConfig)


@dataclass
class LearnerRoleConfig:
    num_actors: int = 1                      # data-parallel DeepSpeed ranks, one Ray actor each
    num_cpus: float = 1
    num_gpus: float = 0
    resources: dict[str, float] = field(default_factory=dict)
    placement: str = "pack"                  # "pack" | "spread" across nodes
    zero_stage: int = 2                      # 0 | 1 | 2 | 3
    offload_optimizer: bool = False
    offload_params: bool = False


@dataclass
class ReferenceRoleConfig:
    # "learner": the learner group computes reference log-probs once, before the first update
    #   (no extra model in memory; works under ZeRO-3).
    # "actor": separate Ray actor(s) holding a frozen copy compute them.
    placement: str = "learner"
    num_actors: int = 1
    num_cpus: float = 1
    num_gpus: float = 0


@dataclass
class SamplingConfig:
    """vLLM sampling parameters of the rollout role."""
    n: int = 4                               # samples per prompt (the group size of grpo/rloo)
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int = 64
    stop: list[str] = field(default_factory=list)
    seed: int = 0
    min_tokens: int = 0                      # no EOS / stop before this many tokens
    ignore_eos: bool = False                 # always generate max_tokens (benchmarks)
    logprobs: bool = True                    # engine log-probs of sampled tokens (rollout/logp_abs_diff check)


@dataclass
class RolloutRoleConfig:
    engines: int = 1                         # vLLM engines, one Ray actor each
    num_cpus: float = 1
    num_gpus: float = 0
    resources: dict[str, float] = field(default_factory=dict)   # custom Ray resources per engine (e.g. a node label)
    placement: Optional[str] = None          # "pack" | "spread": the engines in one placement group
    max_restarts: int = 3                    # an engine that dies is replaced (and re-synced) this often per run
    dtype: str = "auto"                      # "auto": float32 on CPU, bfloat16 on GPU
    max_model_len: int = 512
    gpu_memory_utilization: float = 0.5
    cpu_kv_cache_gib: float = 1.0            # VLLM_CPU_KVCACHE_SPACE on CPU-only nodes
    enforce_eager: bool = True
    weight_sync: str = "object_store"        # "object_store" | "process_group" (gloo/NCCL broadcast)
    # with model.lora: "merged" weights | "adapter" only (vLLM serves it; object store) | "auto" (per engine kind)
    lora_sync: str = "auto"
    colocate_with_learners: bool = False     # engine i shares learner i's placement-group bundle (node/GPU)
    verify_sync_prompts: int = 0             # > 0: after the last sync, compare engine vs learner greedy outputs
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class RewardSourceConfig:
    name: Optional[str] = None               # label of this component in metrics (default: from fn)
    fn: Optional[str] = None                 # "package.module:function", called per sample
    model: Optional[str] = None              # or an HF sequence-classification reward model (its own actor)
    # or an ensemble of reward models (one actor holds them all; Coste et al. 2023), combined per sample by
    # `aggregate`: mean | min (worst case) | uwo (mean - uwo_coef * variance over the members)
    models: list[str] = field(default_factory=list)
    aggregate: str = "mean"
    uwo_coef: float = 0.0
    # a multi-head (attribute) model: the weighted sum of its heads, e.g. {helpfulness: 1, verbosity: -0.5}
    attribute_weights: dict[str, float] = field(default_factory=dict)
    # log_sigmoid: log sigma(r - reference_reward) (Wang et al. 2024); such sources sum like an AND
    transform: Optional[str] = None
    reference_reward: float = 0.0            # r_ref: this constant, or (reference_from: reference_samples) per
    reference_from: str = "constant"         # prompt, the score of one sample of the initial (reference) policy
    normalize: bool = False                  # standardise this source with its running mean / std
    batch_tokens: int = 8192                 # padded tokens per reward-model forward
    num_cpus: float = 1                      # resources of a reward-model actor
    num_gpus: float = 0
    weight: float = 1.0                      # weight in the combined sequence reward
    # objective constrained_ppo: a constraint on this component instead of a weight (Moskovitz et al. 2023)
    constraint: Optional[str] = None         # "ge" (J >= threshold, mu-PPO) | "eq" (J = threshold, xi-PPO)
    threshold: Optional[float] = None        # theta: the batch-mean return this component should reach/hold
    multiplier_init: Optional[float] = None  # initial lambda (default 0.5 for ge, 0 for eq)


@dataclass
class ProcessRewardConfig:
    """Step-level (process) rewards, refined as in Gao et al. 2024 (arXiv 2410.15115)."""
    fn: Optional[str] = None                 # "package.module:function" -> one reward per step, or
    model: Optional[str] = None              # a process reward model (`prefopt train` objective prm): every
                                             # step scored at its last token, in one forward; or, with
    reference: Optional[str] = None          # a reference, an implicit PRM: `model` is a causal LM (e.g. DPO-
    beta: float = 0.05                       # trained), step reward = beta * sum of the step's log pi/pi_ref
    batch_tokens: int = 8192
    num_cpus: float = 1                      # resources of the PRM actor
    num_gpus: float = 0
    delimiter: str = "\n"                    # steps are the response text split on this
    alpha: float = 1.0                       # weight of the process rewards next to the success reward
    clip_eta: Optional[float] = None         # Clip: r~_k = min(r_k - eta, 0)
    delta: bool = False                      # Delta: r~_k = r_k - r_{k+1}, r~_K = r_K (after Clip if both)


@dataclass
class RewardRoleConfig:
    """Sequence rewards: a weighted sum of sources per rollout sample.

    A reward function (``fn``) is imported only from the module the recipe names and runs on the
    driver; it receives ``prompt`` (text), ``response`` (text) and ``row`` (the prompt row's fields)
    and returns a float. A reward model (``model``) runs in its own Ray actor. The weighted sum
    lands on the response's last token (with process rewards it is the "success" reward).
    """
    sources: list[RewardSourceConfig] = field(default_factory=list)
    process: Optional[ProcessRewardConfig] = None   # step rewards placed at each step's last token


@dataclass
class CriticRoleConfig(LearnerRoleConfig):
    path: Optional[str] = None               # critic initialisation (default: model.path)
    lr: Optional[float] = None               # default: train.lr


@dataclass
class RolesConfig:
    learner: LearnerRoleConfig = field(default_factory=LearnerRoleConfig)
    reference: Optional[ReferenceRoleConfig] = None
    rollout: Optional[RolloutRoleConfig] = None
    reward: Optional[RewardRoleConfig] = None
    critic: Optional[CriticRoleConfig] = None


@dataclass
class TrainConfig:
    seed: int = 0
    epochs: int = 1
    max_steps: int = -1                      # > 0 caps the number of optimizer steps
    batch_size: int = 8                      # examples (pairs or lists) per optimizer step, all learners
    micro_batch_size: int = 4                # examples per learner per forward/backward
    # token budgets (padding-free forwards): a micro-batch takes consecutive examples up to this many
    # tokens of the packed row instead of micro_batch_size examples (null: by count)
    micro_batch_tokens: Optional[int] = None             # training forwards/backwards
    inference_micro_batch_tokens: Optional[int] = None   # no-grad passes (reference / old log-probs,
                                                         # values, evaluation); null: as training
    lr: float = 5.0e-7
    lr_scheduler: str = "cosine"             # "constant" | "linear" | "cosine"
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1.0e-8
    max_grad_norm: float = 1.0               # 0 disables clipping
    precision: str = "fp32"                  # "fp32" | "bf16" | "fp16"
    eval_every: int = 0                      # steps (online: iterations) between held-out evaluations
                                             # (offline 0: start and end only; online 0: none)
    # online (rollout) objectives: each iteration samples prompts_per_iteration x sampling.n responses
    iterations: int = 10
    prompts_per_iteration: int = 8
    async_rollouts: bool = False             # online: sample the next batch while learning (one-step off-policy)
    # online: drop groups whose rewards all tie (no signal) and sample more prompts until the batch is full,
    # at most max_sampling_rounds generations per iteration (DAPO's dynamic sampling; counted in metrics)
    dynamic_sampling: bool = False
    max_sampling_rounds: int = 4
    # online preference optimization (objective dpo | ipo | simpo | lipo | listmle with roles.rollout):
    # a prompt's best and worst samples form a pair only when their rewards differ by more than this
    min_reward_gap: float = 0.0
    sample_log_every: int = 0                # online: every N iterations, sampled completions to samples.jsonl
    log_every: int = 1
    # numerical guards: a step with a non-finite loss / gradient is skipped (logged as `skipped`);
    # more than this many skipped steps in a row stop the run, naming the step and its batch
    max_skipped_steps: int = 3
    skip_grad_norm_above: Optional[float] = None   # skip a step whose (pre-clipping) gradient norm exceeds this
    debug_nan_steps: list[int] = field(default_factory=list)   # testing the guard: NaN loss at these steps


@dataclass
class OutputConfig:
    root: str = "runs"
    run_dir: Optional[str] = None            # default: {root}/{name}-{timestamp}; must not hold results
    save_model: bool = True                  # final model in HF format (safetensors)
    # experiment loggers besides metrics.jsonl (always written): "tensorboard", "wandb", "mlflow"
    # (prefopt.io.loggers; wandb and mlflow are pip extras: pip install 'prefopt[wandb]')
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: Optional[str] = None      # default: "prefopt"
    wandb_entity: Optional[str] = None       # default: the W&B account's default entity
    mlflow_tracking_uri: Optional[str] = None   # default: file:{run_dir}/mlflow (a file store in the run folder)
    mlflow_experiment: Optional[str] = None  # default: the recipe's name
    progress_bar: bool = True
    log_level: str = "info"                  # "info": status lines, no third-party output; "warning"; "debug": all
    checkpoint_every: int = 0                # online: every N iterations (and at the end); 0: none
    keep_checkpoints: int = 2                # the last K checkpoints are kept (0: all)
    checkpoint_hf: bool = True               # each checkpoint also holds hf/: the policy as HF safetensors


@dataclass
class RayConfig:
    # "local": an embedded single-node cluster (dashboard off, bound to 127.0.0.1);
    # "auto" or "HOST:PORT" / "ray://HOST:10001": connect to an existing cluster.
    address: str = "local"
    num_cpus: Optional[int] = None           # logical CPUs of the embedded cluster (default: what roles need)
    oversubscribe: float = 2.0               # a local cluster offers at most this many logical CPUs per core
    include_dashboard: bool = False
    check_resources: bool = True             # fail fast if the cluster cannot hold the roles (off for autoscalers)
    call_timeout_s: float = 1800.0           # bound on any remote call; a dead actor never hangs the run
    # extra environment variables for every actor; values are strings: quote numbers in YAML
    # (OMP_NUM_THREADS: '1'); an override ray.env.NAME=1 keeps its text
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Recipe:
    name: str = "run"
    description: str = ""
    base: Optional[str] = None               # path of a recipe this one extends (relative to this file)
    resume: Optional[str] = None             # "auto" | a run directory | a checkpoint directory
    # prefopt reproduce: ranges [low, high] of final metrics ("<split>/<key>" or "summary/<key>")
    expect: dict[str, list[float]] = field(default_factory=dict)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    objective: Any = field(default_factory=lambda: {"name": "dpo"})
    roles: RolesConfig = field(default_factory=RolesConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    ray: RayConfig = field(default_factory=RayConfig)
