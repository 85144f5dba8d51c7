"""The job configuration: typed dataclasses that hold the only defaults in the project.

YAML files under configs/ are deltas on top of these; `loader.load_config` merges them in struct
mode (an unknown key is an error) and `validate.validate` checks the fields against each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from omegaconf import MISSING


class Precision(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp8 = "fp8"  # bf16 + Transformer Engine FP8 GEMMs; needs the `gpu` extra and a CUDA GPU


class Backend(str, Enum):
    auto = "auto"  # nccl when CUDA is available, else gloo
    nccl = "nccl"
    gloo = "gloo"


class LayerImpl(str, Enum):
    auto = "auto"  # Transformer Engine when it imports (GPU), else megatron's local modules
    local = "local"
    te = "te"


class RouterMode(str, Enum):
    """How an MoE student's router is trained during distillation (an explicit choice, DESIGN.md)."""

    trainable = "trainable"  # learns from the task loss only
    aux_loss = "aux_loss"  # learns, plus the load-balancing auxiliary loss (Qwen3 pre-training)
    frozen = "frozen"  # router weights are not updated


class LRDecay(str, Enum):
    cosine = "cosine"
    linear = "linear"
    constant = "constant"


class DataKind(str, Enum):
    synthetic = "synthetic"  # a deterministic, learnable token stream (smoke runs, parity tests)
    tokens = "tokens"  # JSONL, one {"input_ids": [...]} per line
    chat = "chat"  # JSONL conversations rendered with the tokenizer's chat template (distillation)


class Overlong(str, Enum):
    """What happens to a rendered sample longer than train.seq_length + 1 tokens."""

    truncate = "truncate"  # keep the first seq_length + 1 tokens (the prompt must fit)
    drop = "drop"


class BadLine(str, Enum):
    error = "error"  # stop before training, naming file and line
    skip = "skip"  # skip it, count it, log the count


class Mode(str, Enum):
    think = "think"
    no_think = "no_think"


class KDKind(str, Enum):
    forward_kl = "forward_kl"  # KL(teacher ‖ student): mode-covering, the off-policy default
    reverse_kl = "reverse_kl"  # KL(student ‖ teacher): mode-seeking, the on-policy default
    jsd = "jsd"
    skew_forward_kl = "skew_forward_kl"
    skew_reverse_kl = "skew_reverse_kl"


class OnPolicyObjective(str, Enum):
    """What the on-policy phase minimises on the student's own answers."""

    kd = "kd"  # onpolicy.kd_kind to the teacher's distribution at every answer token (distillation)
    grpo = "grpo"  # policy gradient on a verifier's reward, group-normalised (reinforcement learning)


class Phase(str, Enum):
    """A distillation phase (DESIGN.md); a run lists its phases in order in `phases`."""

    offpolicy = "offpolicy"  # learn from the teacher's answers (data.path), train.steps steps
    onpolicy = "onpolicy"  # learn on the student's own answers scored by the teacher, onpolicy.steps


class RolloutDtype(str, Enum):
    auto = "auto"  # bf16 on a GPU, fp32 on a CPU
    bf16 = "bf16"
    fp32 = "fp32"


class TeacherPrecision(str, Enum):
    auto = "auto"  # bf16 on a GPU, fp32 on a CPU
    bf16 = "bf16"
    fp32 = "fp32"


@dataclass
class ModelConfig:
    """A Qwen3 architecture. Field names follow the Hugging Face `config.json` of Qwen3."""

    name: str = MISSING
    num_hidden_layers: int = MISSING
    hidden_size: int = MISSING
    intermediate_size: int = MISSING  # dense FFN width (unused by MoE layers)
    num_attention_heads: int = MISSING
    num_key_value_heads: int = MISSING
    head_dim: int = 128
    vocab_size: int = 151936  # embedding / lm_head width; the tokenizer has 151,669 real tokens
    max_position_embeddings: int = 40960
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    qk_norm: bool = True  # Qwen3 RMS-normalises q and k per head
    # MoE (Qwen3-MoE): num_experts == 0 means a dense model.
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = True
    router_aux_loss_coef: float = 0.001
    router: RouterMode = RouterMode.aux_loss
    # Weight init for models trained from scratch (tests, toy teachers).
    init_std: float = 0.02


@dataclass
class ParallelConfig:
    tensor: int = 1
    pipeline: int = 1
    virtual_pipeline: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)
    # Uneven pipelines: layers on the first / last stage; the rest split evenly over the middle.
    first_stage_layers: int | None = None
    last_stage_layers: int | None = None
    expert: int = 1
    expert_tensor: int | None = None  # defaults to `tensor` (megatron's default)
    context: int = 1  # not supported yet: asking for it is an error
    sequence_parallel: bool = False
    distributed_optimizer: bool = False
    backend: Backend = Backend.auto
    # Expected world size. None: taken from WORLD_SIZE (torchrun / SLURM), 1 when unset.
    world_size: int | None = None


@dataclass
class OptimConfig:
    lr: float = 3e-4
    min_lr: float = 3e-5
    warmup_steps: int = 0
    decay: LRDecay = LRDecay.cosine  # after warmup, from lr down to min_lr at decay_steps
    # The step at which the decay reaches min_lr. None: the run's last step (all phases). Set it
    # when a run is one part of a longer schedule (e.g. the off-policy phase of a run whose arms
    # continue it), so the part follows the whole schedule.
    decay_steps: int | None = None
    weight_decay: float = 0.01
    adam_beta1: float = 0.9
    adam_beta2: float = 0.95
    adam_eps: float = 1e-8
    clip_grad: float = 1.0  # 0 disables clipping


@dataclass
class TrainConfig:
    steps: int = 100  # of the off-policy phase (or of a run without a teacher)
    global_batch_size: int = 8  # sequences per optimizer step, over all data-parallel ranks
    micro_batch_size: int = 1
    seq_length: int = 128
    seed: int = 1234
    precision: Precision = Precision.fp32
    layer_impl: LayerImpl = LayerImpl.auto
    log_interval: int = 1
    # Stop at the next step boundary with a complete checkpoint (exit code 75, qwen3kd/stop.py)
    # once this many minutes have passed since the job started: a deadline before the scheduler's
    # wall-clock limit. SIGUSR1 does the same at any time. None: no deadline.
    exit_after_minutes: float | None = None


@dataclass
class DataConfig:
    kind: DataKind = DataKind.synthetic
    # kind=tokens and kind=chat: a JSONL file, prepared on first use (data/prepared.py), or a
    # folder `qwen3kd prepare` wrote. The trainer reads prepared data only.
    path: str | None = None
    # kind=chat: a Hugging Face tokenizer folder (tokenizer files + chat template). None: the
    # student's checkpoint.load folder (or its hf/ folder).
    tokenizer: str | None = None
    eval_path: str | None = None  # held-out conversations for evaluation (kind=chat)
    default_mode: Mode = Mode.think  # for samples without a "mode" field
    pack: bool = True  # several samples per sequence, attention kept within each sample
    overlong: Overlong = Overlong.truncate
    bad_line: BadLine = BadLine.error
    # The token that closes an assistant turn; the loss covers the answer up to and including it.
    end_of_turn: str = "<|im_end|>"
    shuffle: bool = True  # shuffle samples (seeded by train.seed) before packing
    # Where a JSONL data.path / eval_path is prepared on first use, in a folder named by a hash of
    # its content, tokenizer and settings; None: a `.prepared` folder beside the JSONL.
    cache: str | None = None
    prepare_workers: int = 0  # rendering processes of a prepare; 0: one per CPU core
    prepare_shard_lines: int = 100_000  # source lines per shard: the unit a killed prepare redoes


@dataclass
class CheckpointConfig:
    # Initial student weights, at any TP / PP / EP layout: a Hugging Face folder (config.json +
    # safetensors, read directly, no conversion step) or a Megatron checkpoint (from
    # `qwen3kd convert` or a training checkpoint's weights). Ignored when a run resumes.
    load: str | None = None
    # Training checkpoints (student weights, optimizer, LR schedule, data position, RNG states):
    # <dir>/step_NNNNNNN, written under a temporary name and renamed when complete.
    dir: str = "${run.dir}/checkpoints"
    interval: int = 0  # also save every `interval` steps; 0: only at the end
    save_final: bool = True  # save when the run ends
    keep_last: int = 2  # step checkpoints kept, newest first; 0 keeps all


@dataclass
class KDConfig:
    """The distillation loss (qwen3kd.losses.fused): (1 − alpha)·CE + alpha·T²·D(teacher, student)."""

    kind: KDKind = KDKind.forward_kl
    temperature: float = 1.0
    alpha: float = 1.0  # weight of KD against cross-entropy on the same tokens
    beta: float = 0.5  # jsd mixture weight
    skew: float = 0.1  # skew_*_kl mixture weight
    chunk: int = 192  # tokens per chunk of the vocabulary-parallel loss
    topk: int = 20  # for the teacher top-k mass metric


@dataclass
class TeacherParallelConfig:
    """The teacher's own layout over the trainer's processes. A null field takes the student's
    value (parallel.*); the teacher's data-parallel size is world / (tensor × pipeline). Its layers
    are split evenly over its pipeline stages, without virtual stages."""

    tensor: int | None = None
    pipeline: int | None = None
    expert: int | None = None
    expert_tensor: int | None = None  # null: the teacher's tensor (megatron's default)
    sequence_parallel: bool | None = None


@dataclass
class TeacherConfig:
    """A frozen teacher run in the trainer's own processes, with a parallel layout of its own.
    Its architecture is a model preset merged under `teacher`: `include: [PRESET.yaml@teacher]`."""

    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: TeacherParallelConfig = field(default_factory=TeacherParallelConfig)
    # Weights (required): a Hugging Face folder or a Megatron checkpoint, saved at any layout.
    load: str | None = None
    tokenizer: str | None = None  # None: the tokenizer files next to `load`
    precision: TeacherPrecision = TeacherPrecision.auto
    offload: bool = False  # keep its weights in CPU memory outside its phase of a step (GPU)
    # Tokens per rank whose teacher hidden states are held at once: a step whose micro-batches hold
    # more runs in waves (teacher phase, then the student's forward-backward, per wave; gradients
    # accumulate over the waves). None: the whole step in one wave.
    wave_tokens: int | None = None
    # Experts only: train even when the teacher's and student's tokenizers or chat templates differ.
    skip_conformance: bool = False


@dataclass
class EvalConfig:
    interval: int = 0  # evaluate every `interval` steps (and at the end); 0: never
    samples: int = 64  # held-out sequences per evaluation (from data.eval_path)
    log_samples: int = 4  # rendered held-out samples with their KL / CE, logged as an artifact


@dataclass
class TrackingConfig:
    enabled: bool = True  # MLflow on rank 0; metrics.jsonl is written either way
    uri: str | None = None  # None: sqlite:///<run.dir>/mlflow.db; or an http(s) tracking server
    experiment: str = "qwen3kd"
    timeout_s: float = 10.0  # an unreachable server costs at most about this, then is skipped
    parent_run_id: str | None = None  # nest the run under this MLflow run (a pipeline's, e.g. the demo)
    # Tags set on the run (and on every run of a pipeline: `qwen3kd study` tags each run with
    # its protocol's version and commit).
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class RolloutConfig:
    """The rollout engine (vLLM, in the trainer's processes' reach: one engine per data-parallel
    replica, started by its first rank, on the same devices) and how it samples."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0: no top-k filter
    max_new_tokens: int = 64  # per answer, thinking included
    seed: int = 0  # each prompt's sampling seed is derived from it, the step and the prompt
    # Thinking budget (tokens of a think-mode answer's thinking). When reached, the thinking is cut,
    # `stop_thinking_text` is inserted (it closes the think block) and the answer is generated.
    # None: no budget. The inserted tokens are context, not samples: they carry no loss.
    thinking_budget: int | None = None
    stop_thinking_text: str = (
        "\n\nConsidering the limited time by the user, I have to give the solution based on the "
        "thinking directly now.\n</think>\n\n"
    )
    dtype: RolloutDtype = RolloutDtype.auto
    tensor_parallel: int = 1  # the engine's own TP (its ranks are devices of this replica)
    gpu_memory_utilization: float = 0.4  # GPU: the engine's share while awake (the trainer's is the rest)
    kv_cache_gb: float = 1.0  # CPU: KV-cache size
    max_num_seqs: int = 256
    # Weight sync: push the student's weights into the engine every `sync_interval` optimizer steps.
    sync_interval: int = 1
    sync_bucket_mb: int = 512  # weights travel in messages of at most this size
    # Staleness probe after each sync: the engine's and the trainer's log-probs of the same tokens.
    probe_prompts: int = 2  # the first prompts of the prompt file, rendered in think mode
    probe_tolerance: float | None = None  # max |Δ log-prob|; None: 1e-3 (fp32 engine), 5e-2 (bf16)


@dataclass
class OnPolicyConfig:
    """The on-policy phase: the student answers prompts, the teacher scores those exact tokens."""

    steps: int = 0
    prompts: str | None = None  # JSONL: {"messages": […]} or {"prompt": …, "system": …}, "mode" optional
    think_ratio: float = 0.5  # share of prompts answered in think mode (a line's "mode" wins)
    # Prompts (rollouts) per step over all data-parallel ranks. None: train.global_batch_size.
    # With data.pack the rollouts are packed into rows, so more of them fit in the rows the
    # off-policy phase fills with its packed samples.
    batch_size: int | None = None
    # Reverse KL (student ‖ teacher) over the full vocabulary: mode-seeking, on the student's own
    # samples (Qwen3 report, after Agarwal et al. 2024, GKD). The teacher scores at T = 1 (its
    # plain distribution), whatever the rollout temperature: that only sets how the student explores.
    kd_kind: KDKind = KDKind.reverse_kl
    objective: OnPolicyObjective = OnPolicyObjective.kd
    # Answers per prompt: a group shares the prompt and its mode, each answer has its own seed.
    # The step's rollouts are batch_size = prompts × group_size. GRPO needs ≥ 2 (its baseline is
    # the group's mean reward); with the same value, the kd and grpo arms of an experiment see the
    # same prompts, modes and sampling seeds at every step (common random numbers).
    group_size: int = 1
    # The reward (qwen3kd/rollout/verifiers.py, by name): grpo trains on it; every run whose prompts
    # all have an "answer" reports it (rollout/reward/MODE).
    verifier: str = "exact_match"
    grpo_eps: float = 1.0e-6  # advantage = (r − group mean) / (group std + grpo_eps)


@dataclass
class GenerateConfig:
    """`qwen3kd generate`: the teacher answers prompts; the result is off-policy training data."""

    prompts: str | None = None  # JSONL, as onpolicy.prompts
    output: str = "${run.dir}/generated.jsonl"
    think_ratio: float = 0.5  # share of prompts answered in think mode (a line's "mode" wins)
    both_modes: bool = False  # answer every prompt in both modes (think_ratio is then unused)
    shard_size: int = 64  # prompts per shard: the unit of resumption, each written atomically


@dataclass
class AccuracyConfig:
    """`qwen3kd eval`: models answer held-out prompts greedily in each mode, graded against the
    prompts' reference answers (qwen3kd/rollout/accuracy.py)."""

    prompts: str | None = None  # JSONL prompt lines, each with an "answer"
    output: str = "${run.dir}/accuracy.json"
    modes: list[Mode] = field(default_factory=lambda: [Mode.think, Mode.no_think])
    max_new_tokens: int = 256
    thinking_budget: int | None = None  # as rollout.thinking_budget; None: think freely
    tokenizer: str | None = None  # None: the tokenizer files of the first model
    # pass@k: answers per problem and mode sampled at temperature 1 (0: greedy accuracy only),
    # and the k reported (each ≤ samples).
    samples: int = 0
    pass_k: list[int] = field(default_factory=lambda: [1, 4])


class DemoVariant(str, Enum):
    """The task variants of the study (study/protocol.md)."""

    plain = "plain"  # the demo's task
    recoverable = "recoverable"  # think traces may repair a slip with a check line (demo.slip_rate)
    # few teacher answers off-policy, many fresh prompts on-policy, a compute-matched control (demo.scarce)
    scarce = "scarce"


class EvalSet(str, Enum):
    """The held-out problems the demo's table (its eval stage) answers."""

    test = "test"  # eval.jsonl: the test set
    dev = "dev"  # dev.jsonl: the dev curves' problems (the study's dev phase never sees the test set)


class StudyPhase(str, Enum):
    """study/protocol.md, section 3: dev seeds tune on the dev set; test seeds run once on the
    locked test set."""

    dev = "dev"
    test = "test"


@dataclass
class DemoTeacherConfig:
    """How `qwen3kd demo` trains its toy teacher (cross-entropy on the task's ground truth, both
    modes); the other training settings are the experiment's train.* ones."""

    steps: int = 1000
    global_batch_size: int = 16
    # The teacher's own seed (not train.seed): every seed of a study distils from one teacher.
    seed: int = 1234
    lr: float = 3e-3
    min_lr: float = 3e-4
    decay: LRDecay = LRDecay.cosine
    warmup_steps: int = 50


@dataclass
class DemoScarceConfig:
    """The *scarce* variant (study/protocol.md): teacher answers are few, prompts plentiful."""

    # Training-split prompts the teacher answers in both modes: the off-policy data (2 answers each)
    answered_prompts: int = 400
    # Fresh training-split prompts, disjoint from those: the on-policy arms' prompts, and the
    # prompts whose teacher answers (both modes) the compute-matched control continues on.
    prompts: int = 4000


@dataclass
class DemoConfig:
    """`qwen3kd demo` (qwen3kd/demo/pipeline.py): the toy strong-to-weak pipeline. The experiment
    config describes the distillation (student = model, teacher = teacher.model, kd, onpolicy,
    rollout, accuracy); these keys describe the toy task and the teacher's own training."""

    cache: str = "runs/demo-cache"  # task assets and trained teachers, reused while their settings match
    seed: int = 0
    variant: DemoVariant = DemoVariant.plain
    # recoverable: the share of think-mode ground-truth traces with one slip (a column total off
    # by 1 or 2, a span without loss) and the check line that repairs it (qwen3kd/demo/task.py)
    slip_rate: float = 0.5
    # recoverable: the teacher gate's held-out prefixes (half end with a slip), checked before the
    # arms run (qwen3kd/study/gate.py); a failed gate stops the demo
    gate_problems: int = 1000
    train_problems: int = 40000  # ground-truth conversations the teacher is trained on
    prompts: int = 2000  # training-split prompts: answered by the teacher in both modes (off-policy
    # data) and answered by the student on-policy
    eval_problems: int = 256  # held out: never in training data or prompts (the table's test set)
    dev_problems: int = 100  # held out too, apart from those: the arms' learning curves
    # Seeds of their own for the test and dev problems (the study's locked sets: study/protocol.md),
    # drawn in that order, each disjoint from the ones before, and the training problems and
    # prompts from demo.seed disjoint from both. None (both): all held-out problems from demo.seed.
    test_seed: int | None = None
    dev_seed: int | None = None
    eval_set: EvalSet = EvalSet.test  # what the table's models answer
    # Every `curve_interval` steps each arm keeps a checkpoint that the eval stage scores on the
    # dev problems (greedy): accuracy against steps and against FLOPs. 0: no curves.
    curve_interval: int = 25
    # The RL arm's learning rates (optim.lr, optim.min_lr) are the schedule's × this. At the
    # distillation rates GRPO diverged on the demo (README): RL is run an order of magnitude lower,
    # as RL practice does.
    rl_lr_scale: float = 0.1
    nproc: int = 1  # processes per training stage (torchrun); the layout is parallel.*
    # The evaluation and the dev curves run at once (up to this many stages; the CPU's threads
    # shared among them): much of each is one busy core (a fresh interpreter importing, exporting
    # checkpoints, vLLM's engine starting). 1: in turn. (The arms always run in turn.)
    concurrent_stages: int = 2
    teacher: DemoTeacherConfig = field(default_factory=DemoTeacherConfig)
    scarce: DemoScarceConfig = field(default_factory=DemoScarceConfig)
    # The table's teacher and untrained-student rows. A study's units set this false: both models
    # are the same for every seed (demo.teacher.seed), so evaluating them per unit costs a third
    # of the evaluation and tells nothing new.
    eval_fixed_models: bool = True
    # The student before distillation. None: random init. A list of teacher layers: the trained
    # teacher with only those layers kept (depth pruning, as Minitron and DistilBERT initialise
    # their students); the student preset must then be the teacher's with that many layers.
    student_layers: list[int] | None = None


@dataclass
class StudyConfig:
    """`qwen3kd study run|report` (qwen3kd/study/run.py): the pre-registered study
    (study/protocol.md): the demo's pipeline (demo.*) for every variant × seed, then the
    protocol's analysis. A seed sets train.seed and rollout.seed; the task's problems
    (demo.seed) and the teacher (demo.teacher.seed) are the same for every seed."""

    # Its version (its "**Protocol version N**" line) and last commit are tagged on every run.
    protocol: str = "study/protocol.md"
    # dev: the units' tables answer the dev set (demo.eval_set=dev). test: the locked test set,
    # whose sha256 the first unit records in <run.dir>/test_set.sha256 and every later one must match.
    phase: StudyPhase = StudyPhase.dev
    variants: list[DemoVariant] = field(default_factory=lambda: [DemoVariant.plain, DemoVariant.recoverable])
    seeds: list[int] = field(default_factory=lambda: [100, 101])  # dev seeds (the protocol's test seeds: 0, 1, 2)
    margin: float = 0.03  # the equivalence margin δ, in accuracy (3 points)
    alpha: float = 0.05  # family-wise, Holm over the primary hypotheses
    resamples: int = 10000  # hierarchical bootstrap


@dataclass
class RunConfig:
    name: str = "run"
    dir: str = "runs/${run.name}"


@dataclass
class JobConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    # Distillation: a teacher makes the run a distillation (loss `kd`); without one the student
    # trains alone on cross-entropy.
    teacher: TeacherConfig | None = None
    kd: KDConfig = field(default_factory=KDConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    # Distillation phases, in order; each hands its weights (and a checkpoint) to the next.
    phases: list[Phase] = field(default_factory=lambda: [Phase.offpolicy])
    onpolicy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    accuracy: AccuracyConfig = field(default_factory=AccuracyConfig)
    demo: DemoConfig = field(default_factory=DemoConfig)
    study: StudyConfig = field(default_factory=StudyConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # never: start from checkpoint.load (or random init); auto: continue from the newest complete
    # checkpoint under checkpoint.dir if there is one; or the path of one step checkpoint.
    resume: str = "never"
