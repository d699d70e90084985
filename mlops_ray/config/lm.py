"""jobs.train with `task: lm`: a decoder-only transformer on a synthetic token stream
(conf/experiment/gpt_synthetic.yaml). The run sections keep their meaning where one exists:
train.batch_size is the global batch in sequences per optimizer step, train.epochs x
lm.steps_per_epoch the number of steps, checkpoint.* and scaling.* as for any run."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationInfo, model_validator

from mlops_ray.config.base import Strict, problems
from mlops_ray.config.train import (
    CheckpointCfg,
    OptimCfg,
    RunSections,
    TrainCfg,
)

# what the LM loop reports (every lm.log_every_n_steps steps; val/loss at epoch ends)
LM_METRICS = ("train/loss", "val/loss", "step", "epoch", "epochs_done", "perf/tokens_per_s",
              "perf/step_ms", "perf/tflops", "perf/mfu")


class SyntheticTokensCfg(Strict):
    """mlops_ray.models.synthetic.SyntheticTokens: batches are a pure function of (seed, step)."""
    name: str = "synthetic_tokens"
    uri: Literal["synthetic://tokens"] = "synthetic://tokens"
    noise: float = Field(0.1, ge=0, le=1)  # chance a position jumps to a random token


class GptModelCfg(Strict):
    """`_target_(size, checkpointing=..., **overrides)` -> a module with forward(idx, targets)
    -> (logits, loss), num_params() and flops_per_token(): mlops_ray.models.gpt.build_gpt."""
    target: str = Field("mlops_ray.models.gpt.build_gpt", alias="_target_")
    size: str = "tiny"
    n_layer: int | None = Field(None, ge=1)
    n_head: int | None = Field(None, ge=1)
    n_embd: int | None = Field(None, ge=1)
    block_size: int | None = Field(None, ge=1)  # sequence length
    vocab_size: int | None = Field(None, ge=2)
    dropout: float = Field(0.0, ge=0, lt=1)
    bias: bool | None = None

    @model_validator(mode="after")
    def _size(self) -> GptModelCfg:
        if self.target != "mlops_ray.models.gpt.build_gpt":
            return self
        from mlops_ray.models.gpt import SIZES  # torch, only when this schema is used
        if self.size not in SIZES:
            raise ValueError(f"model.size={self.size!r}: allowed {', '.join(sorted(SIZES))}")
        n_embd = self.n_embd or SIZES[self.size]["n_embd"]
        n_head = self.n_head or SIZES[self.size]["n_head"]
        if n_embd % n_head:
            raise ValueError(f"model: n_embd={n_embd} is not divisible by n_head={n_head}")
        return self

    def spec(self) -> dict[str, Any]:
        """The builder spec (the architecture fields given; None: the size's own)."""
        return {k: v for k, v in self.model_dump(by_alias=True).items() if v is not None}


class LmCfg(Strict):
    """Options of the LM loop (mlops_ray/train/tasks/lm.py); conf/lm/{default,gpu}.yaml."""
    steps_per_epoch: int = Field(20, ge=1)  # the stream is endless: total = train.epochs x this
    grad_accum_steps: int = Field(1, ge=1)  # micro-batches per optimizer step
    grad_clip: float = Field(1.0, ge=0)  # max global gradient norm; 0 = off
    lr_warmup_steps: int = Field(0, ge=0)  # linear warm-up, then train.lr_schedule
    compile: bool = False
    compile_mode: Literal["default", "reduce-overhead", "max-autotune",
                          "max-autotune-no-cudagraphs"] = "default"
    fused_optimizer: bool = False
    activation_checkpointing: bool = False
    strategy: Literal["ddp", "fsdp"] = "ddp"
    tf32: bool = True  # TF32 for fp32 matmuls and convolutions (CUDA only)
    pin_memory: bool = True  # page-locked host batches (CUDA only)
    non_blocking: bool = True  # asynchronous host-to-device copies on a side stream (CUDA only)
    prefetch: int = Field(2, ge=0)  # batches a background thread makes ahead; 0 = inline
    log_every_n_steps: int = Field(10, ge=1)
    warmup_steps: int = Field(5, ge=0)  # first steps left out of the steady-state throughput
    val_batches: int = Field(2, ge=1)  # held-out batches for val/loss at each epoch end
    # dense bf16 peak TFLOP/s by a substring of the GPU's name (longest match wins), merged over
    # mlops_ray.perf.PEAK_TFLOPS; the override wins over both
    peak_tflops: dict[str, float] = {}
    peak_tflops_override: float | None = Field(None, gt=0)


class LmJob(RunSections):
    """jobs.train with `task: lm`."""
    task: Literal["lm"]
    dataset: SyntheticTokensCfg = SyntheticTokensCfg()
    model: GptModelCfg = GptModelCfg()
    optim: OptimCfg
    lm: LmCfg = LmCfg()
    checkpoint: CheckpointCfg = CheckpointCfg(checkpoint_score_attribute="val/loss",
                                              checkpoint_score_order="min")
    train: TrainCfg = TrainCfg(early_stopping=None)
    from_tune: str | None = None  # accepted so the composed train.yaml validates; must be null

    def total_steps(self) -> int:
        return self.train.epochs * self.lm.steps_per_epoch

    @model_validator(mode="after")
    def _lm_cross(self, info: ValidationInfo) -> LmJob:
        p: list[str] = []
        lo, hi = self.scaling.bounds()
        accum = self.lm.grad_accum_steps
        for n in range(lo, hi + 1):
            if self.train.batch_size % (n * accum):
                p.append(f"train.batch_size={self.train.batch_size} is not divisible by "
                         f"scaling.num_workers={n} x lm.grad_accum_steps={accum} (each worker "
                         "runs batch_size / (workers x accum) sequences per micro-batch)")
        if self.train.precision == "bf16" and not self.scaling.use_gpu:
            p.append("train.precision='bf16' needs scaling.use_gpu=true: the bf16 figures are "
                     "GPU tensor-core figures, and CPU runs use fp32")
        p += self._gpu_resource()
        if not self.lm.compile and self.lm.compile_mode != "default":
            p.append(f"lm.compile_mode='{self.lm.compile_mode}' has no effect with "
                     "lm.compile=false (set lm.compile=true)")
        if self.lm.warmup_steps >= self.total_steps():
            p.append(f"lm.warmup_steps={self.lm.warmup_steps} leaves no timed steps: it must be "
                     f"below train.epochs x lm.steps_per_epoch = {self.total_steps()}")
        if self.lm.strategy == "fsdp":
            try:
                from torch.distributed.fsdp import fully_shard  # noqa: F401
            except ImportError:
                p.append("lm.strategy='fsdp' needs FSDP2 (torch.distributed.fsdp.fully_shard, "
                         "torch >= 2.6); use lm.strategy=ddp")
        # FSDP with one worker is allowed: it shards nothing, and is how the FSDP code path
        # (fully_shard, sharded state dicts) is exercised on a single GPU.
        attr = self.checkpoint.checkpoint_score_attribute
        if attr is not None and attr not in LM_METRICS:
            p.append(f"checkpoint.checkpoint_score_attribute='{attr}' is not reported by task=lm "
                     f"(allowed: {', '.join(LM_METRICS)})")
        if attr and attr.endswith("loss") and self.checkpoint.checkpoint_score_order != "min":
            p.append(f"checkpoint.checkpoint_score_order='{self.checkpoint.checkpoint_score_order}'"
                     f" keeps the worst checkpoints by {attr} (use 'min')")
        es = self.train.early_stopping
        if es is not None and (es.metric not in ("train/loss", "val/loss") or es.mode != "min"):
            p.append(f"train.early_stopping: metric='{es.metric}' mode='{es.mode}'; task=lm "
                     "stops on train/loss or val/loss with mode='min' (or set it to null)")
        if self.train.fairness_penalty.kind != "none":
            p.append("train.fairness_penalty applies to tabular classifiers: task=lm has no "
                     "groups (set train.fairness_penalty.kind=none)")
        if self.from_tune is not None:
            p.append(f"from_tune={self.from_tune!r}: tuning runs are tabular; task=lm trains "
                     "from its own config (set from_tune=null)")
        problems(p, self._fits(info))
        return self

    def data_version(self) -> str:
        """The stream is a function of its config (and the seed, which the config hash holds)."""
        from mlops_ray.utils import stable_hash
        return stable_hash({"generator": "SyntheticTokens", **self.dataset.plain()})
