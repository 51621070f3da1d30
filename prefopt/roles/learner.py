"""The learner role: one data-parallel DeepSpeed rank per Ray actor.

The driver creates ``num_actors`` of these; they join one torch.distributed group and split each
global batch. Every public method that touches the model is *collective*: the driver calls it on
all learners at once, with the same number of micro-batches on each (see ``data/batching.py``).

A learner trains the policy (``model_kind="policy"``: causal LM, log-prob forward), the critic
(``model_kind="critic"``: the same backbone with a one-output token head, value forward), or a
reward model (an objective whose ``model_kind`` is ``"reward"``: a score head read at the last token
or at step ends, :mod:`prefopt.models.reward`).
"""
from __future__ import annotations

import os
import time

from prefopt.config_schema import LearnerRoleConfig, Recipe


def peak_memory_mb() -> float:
    """Peak memory of this process: GPU memory allocated on CUDA, else peak resident set size."""
    import resource

    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


class LearnerWorker:
    def __init__(self, recipe: Recipe, rank: int, world_size: int, *, model_kind: str = "policy",
                 role_cfg: LearnerRoleConfig | None = None, objective=None, value_heads: int = 1):
        self.recipe, self.rank, self.world_size = recipe, rank, world_size
        self.model_kind, self.value_heads = model_kind, value_heads
        self.role_cfg = role_cfg or recipe.roles.learner
        self._objective = objective
        self.engine = None
        from prefopt.roles.common import use_actor_cpus
        use_actor_cpus(self.role_cfg.num_cpus, recipe.ray.env)

    # ------------------------------------------------------------------ set-up
    def address(self) -> tuple[str, int]:
        from prefopt.backends.distributed import free_port, node_ip
        return node_ip(), free_port()

    def setup(self, master_addr: str, master_port: int, *, total_steps: int, grad_accum: int,
              pad_id: int, lr: float | None = None) -> dict:
        import dataclasses

        import torch

        from prefopt.backends.deepspeed_engine import init_engine
        from prefopt.backends.distributed import init_process_group
        from prefopt.models.load import load_causal_lm, load_value_model
        from prefopt.objectives import get_objective

        r = self.recipe
        objective_cls = get_objective(r.objective.name)
        if self.model_kind == "policy" and objective_cls.model_kind == "reward":
            self.model_kind = "reward"
        torch.manual_seed(r.train.seed)
        backend = init_process_group(self.rank, self.world_size, master_addr, master_port,
                                     timeout_s=r.ray.call_timeout_s)
        path = getattr(self.role_cfg, "path", None) or r.model.path   # a critic may start elsewhere
        kwargs = dict(precision="fp32", trust_remote_code=r.model.trust_remote_code,
                      attn_implementation=r.model.attn_implementation)
        from prefopt.models.packing import packing_mode
        self.packing = packing_mode(r.model)
        if self.model_kind == "policy":
            model = load_causal_lm(path, padding_free=r.model.padding_free, **kwargs)
        elif self.model_kind == "reward":
            from prefopt.models.reward import load_reward_model
            labels = objective_cls.head_labels(r)
            model = load_reward_model(path, num_labels=len(labels), labels=labels, pad_token_id=pad_id,
                                      padding_free=r.model.padding_free, **kwargs)
        else:
            model = load_value_model(path, num_heads=self.value_heads, padding_free=r.model.padding_free, **kwargs)
        if r.model.gradient_checkpointing:
            model.gradient_checkpointing_enable()
        if r.model.lora is not None:
            from prefopt.models.lora import apply_lora
            torch.manual_seed(r.train.seed)      # the adapters' A init: the same on every rank and resume
            model = apply_lora(model, r.model.lora, self.model_kind)
        train_cfg = r.train if lr is None else dataclasses.replace(r.train, lr=lr)
        self.engine = init_engine(model, train_cfg, self.role_cfg, grad_accum=grad_accum,
                                  total_steps=total_steps)
        self.objective = self._objective or objective_cls.from_recipe(r)
        self.pad_id = pad_id
        self.device = self.engine.device
        from prefopt.roles.common import actor_info
        return {**actor_info(self.model_kind), "rank": self.rank, "backend": backend, "device": str(self.device),
                "gradient_allreduce": bool(self.engine.enable_backward_allreduce),
                "num_parameters": _numel(self.engine.module.parameters()),
                "trainable_parameters": _numel(p for p in self.engine.module.parameters() if p.requires_grad)}

    # ------------------------------------------------------------------ helpers
    def _collate(self, examples: list):
        from prefopt.roles.common import collate_to
        return collate_to(examples, self.pad_id, self.device, self.objective.batch_kind)

    def _forward(self, batch):
        from prefopt.models.logprobs import forward_logps, forward_values
        if self.model_kind == "critic":
            return forward_values(self.engine, batch, packing=self.packing)
        if self.model_kind == "reward":
            from prefopt.models.reward import forward_scores
            return forward_scores(self.engine, batch, packing=self.packing)
        return forward_logps(self.engine, batch, self.objective.temperature,
                             with_entropy=self.objective.wants_entropy,
                             packing=self.packing)

    # ------------------------------------------------------------------ collective calls
    def compute_logps(self, micro_batches: list[list[dict]], reference: bool = False) -> list[list[list[float]]]:
        """Summed response log-probs (eval mode, no grad), e.g. to cache reference log-probs.
        ``reference``: with the LoRA adapters disabled (the base model: the reference)."""
        from prefopt.models.lora import adapters_off
        from prefopt.roles.common import response_logps
        self.engine.eval()
        try:
            with adapters_off(self.engine.module) if reference else _nothing():
                return response_logps(self.engine, micro_batches, self.pad_id, self.device,
                                      self.objective.batch_kind, packing=self.packing)
        finally:
            self.engine.train()

    def compute_token_logps(self, micro_batches: list[list[dict]], reference: bool = False) -> list[list[list[float]]]:
        """The policy's log-prob of each response token of each rollout sample (PPO's old log-probs);
        ``reference``: the base model's, with the LoRA adapters disabled (the KL reference)."""
        assert self.model_kind == "policy", self.model_kind
        from prefopt.models.lora import adapters_off
        with adapters_off(self.engine.module) if reference else _nothing():
            return self._per_token(micro_batches)

    def compute_reference_logps(self, micro_batches: list[list[dict]]) -> list[list[list[float]]]:
        """``compute_logps`` of the base model (LoRA adapters disabled): the reference on the learners."""
        return self.compute_logps(micro_batches, reference=True)

    def compute_reference_token_logps(self, micro_batches: list[list[dict]]) -> list[list[list[float]]]:
        """``compute_token_logps`` of the base model (LoRA adapters disabled): the KL reference on the learners."""
        return self.compute_token_logps(micro_batches, reference=True)

    def compute_values(self, micro_batches: list[list[dict]]) -> list[list[list[float]]]:
        """The critic's value at each response token of each rollout sample."""
        assert self.model_kind == "critic", self.model_kind
        return self._per_token(micro_batches)

    def _per_token(self, micro_batches: list[list[dict]]) -> list[list[list[float]]]:
        """No-grad per response token of rollout samples (whatever the objective's own batch kind, e.g.
        online DPO's pairs): log-probs (policy) or values (critic)."""
        import torch

        from prefopt.data.rollouts import response_values
        from prefopt.roles.common import collate_to
        self.engine.eval()
        out = []
        try:
            with torch.no_grad():
                for samples in micro_batches:
                    result = self._forward(collate_to(samples, self.pad_id, self.device, "rollouts"))
                    per_token = result.values if self.model_kind == "critic" else result.token_logps
                    out.append(response_values(per_token.double().cpu(), samples))
        finally:
            self.engine.train()
        return out

    def evaluate(self, micro_batches: list[list[dict]]) -> list[dict]:
        """Objective loss and metrics on held-out micro-batches (no update)."""
        import torch

        from prefopt.metrics import summarize_loss
        self.engine.eval()
        out = []
        with torch.no_grad():
            for examples in micro_batches:
                batch = self._collate(examples)
                out.append(summarize_loss(self.objective.loss(self._forward(batch), batch), len(examples)))
        self.engine.train()
        return out

    def train_step(self, micro_batches: list[list[dict]], inject_nan: bool = False) -> dict:
        """One optimizer step: forward/backward on each micro-batch, then DeepSpeed's step.

        A step whose gradients are not finite (a NaN/Inf loss) is skipped, not applied: ``skipped``
        is 1 in the returned stats. ``inject_nan`` (``train.debug_nan_steps``) makes the loss NaN,
        to exercise that guard.
        """
        from prefopt.metrics import merge_summaries, summarize_loss

        start = time.perf_counter()
        lr = self.engine.get_lr()[0]
        guard = self._client_optimizer()
        skipped_before = self.engine.skipped_steps + getattr(guard, "skipped_steps", 0)
        summaries, grad_norm, tokens = [], None, 0
        total = sum(len(examples) for examples in micro_batches)
        for i, examples in enumerate(micro_batches):
            # micro-batches may differ in size (a token budget): each loss (a mean over its examples)
            # is weighted by its share of the shard, and the last one is the accumulation boundary
            last = i == len(micro_batches) - 1
            self.engine.set_gradient_accumulation_boundary(last)
            batch = self._collate(examples)
            tokens += int(batch["attention_mask"].sum())
            out = self.objective.loss(self._forward(batch), batch)
            if inject_nan:
                out.loss = out.loss * float("nan")
            self.engine.backward(out.loss * (len(examples) / total), scale_wrt_gas=False)
            if last and self.engine.zero_optimization_stage() == 0:
                grad_norm = self._full_grad_norm()   # ZeRO-0 does not record it; grads are all-reduced here
                self._client_optimizer().norm_hint = grad_norm
            self.engine.step()   # applies the update only at the accumulation boundary
            summaries.append(summarize_loss(out, len(examples)))
        if grad_norm is None:
            grad_norm = self.engine.get_global_grad_norm()
        stats = merge_summaries(summaries)
        stats["grad_norm"] = float(grad_norm) if grad_norm is not None else float("nan")
        stats["lr"] = float(lr)
        # one optimizer step per call (ZeRO steps each parameter group separately: count it once)
        stats["skipped"] = int(self.engine.skipped_steps + getattr(guard, "skipped_steps", 0) > skipped_before)
        stats["tokens"] = tokens
        stats["micro_batches"] = len(micro_batches)
        stats["time_s"] = time.perf_counter() - start
        stats["peak_memory_mb"] = peak_memory_mb()
        return stats

    def _client_optimizer(self):
        """prefopt's AdamW (``deepspeed_engine.guarded_adamw``), inside a ZeRO wrapper or not."""
        opt = self.engine.optimizer
        return getattr(opt, "optimizer", opt)

    def _full_grad_norm(self) -> float:
        from prefopt.backends.deepspeed_engine import total_grad_norm
        return total_grad_norm([p.grad.detach() for p in self.engine.module.parameters() if p.grad is not None])

    def export_weights(self, copy: bool = True) -> list | None:
        """The policy's named parameters as CPU tensors on rank 0 (gathered under ZeRO-3); with LoRA the
        merged weights under the base model's names (what the engines and HF exports load).
        ``copy=False``: views of the weights where they are whole on this rank (valid until the next update)."""
        import deepspeed

        zero3 = self.engine.zero_optimization_stage() == 3
        from prefopt.models.lora import is_lora, merged_weights
        if is_lora(self.engine.module):
            named = merged_weights(self.engine.module, self._gather(), copy=copy)   # collective under ZeRO-3: every rank
            return named if self.rank == 0 else None
        out = []
        for name, param in self.engine.module.named_parameters():
            if zero3:
                with deepspeed.zero.GatheredParameters([param], modifier_rank=None):
                    if self.rank == 0:
                        out.append((name, param.data.detach().cpu().clone()))
            elif self.rank == 0:
                data = param.data.detach().cpu()
                out.append((name, data.clone() if copy else data))
        return out if self.rank == 0 else None

    def _gather(self):
        """Under ZeRO-3: a context that makes the given parameters whole on every rank (collective);
        else None (they are)."""
        if self.engine.zero_optimization_stage() != 3:
            return None
        import deepspeed
        return lambda params: deepspeed.zero.GatheredParameters(params, modifier_rank=None)

    def export_weights_to_store(self) -> list | None:
        """``export_weights`` for the object store (rank 0; collective under ZeRO-3): numpy views that Ray
        copies once, straight into the store (``backends.weight_sync.to_wire``)."""
        from prefopt.backends.weight_sync import to_wire
        named = self.export_weights(copy=False)
        return to_wire(named) if named is not None else None

    def export_adapter(self) -> dict | None:
        """LoRA: the adapter in PEFT's form (``models.lora.peft_adapter``) on rank 0 (gathered under
        ZeRO-3, collective): what the engines load with ``roles.rollout.lora_sync: adapter``."""
        from prefopt.models.lora import adapter_state, peft_adapter
        state = adapter_state(self.engine.module, self._gather())   # collective under ZeRO-3
        return peft_adapter(self.engine.module, state) if self.rank == 0 else None

    def join_sync_group(self, host: str, port: int, world_size: int, timeout_s: float) -> list:
        """Rank 0 joins the weight-sync group with the rollout engines; returns the tensor specs."""
        from prefopt.backends.weight_sync import StatelessGroup
        self.sync_group = StatelessGroup(host, port, 0, world_size, timeout_s=timeout_s)
        from prefopt.models.lora import is_lora
        if is_lora(self.engine.module):     # the merged weights' names and shapes (rank 0 exports them)
            return [(name, tuple(t.shape), str(t.dtype).removeprefix("torch.")) for name, t in self.export_weights()]
        return [(name, tuple(getattr(p, "ds_shape", p.shape)), str(p.dtype).removeprefix("torch."))
                for name, p in self.engine.module.named_parameters()]

    def sync_broadcast(self) -> bool:
        """Collective: gather (ZeRO-3) and, on rank 0, broadcast every tensor to the engines."""
        from prefopt.backends.weight_sync import broadcast_weights
        named = self.export_weights()
        if self.rank == 0:
            broadcast_weights(self.sync_group, named)
        return True

    def greedy_generate(self, prompt_ids: list[list[int]], max_new_tokens: int) -> list[list[int]]:
        """HF greedy decoding with the current weights. Collective (every rank decodes; under ZeRO-3
        the ranks stay in lock-step with ``synced_gpus``); for checks and tests."""
        import torch
        model = self.engine.module
        model.eval()
        outs = []
        zero3 = self.engine.zero_optimization_stage() == 3
        with torch.no_grad():
            for ids in prompt_ids:
                x = torch.tensor([ids], device=self.device)
                y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                                   do_sample=False, pad_token_id=self.pad_id, use_cache=True,
                                   synced_gpus=zero3)
                outs.append(y[0, len(ids):].tolist())
        model.train()
        return outs

    def save_model(self, out_dir: str) -> bool:
        """Write the policy in HF format (safetensors). Collective under ZeRO-3; rank 0 writes. With LoRA:
        the merged model in ``out_dir`` and the adapter in PEFT's format in ``out_dir/adapter``."""
        from prefopt.models.lora import is_lora
        if is_lora(self.engine.module):
            return self._save_lora(out_dir)
        if self.engine.zero_optimization_stage() == 3:
            state = self.engine._zero3_consolidated_16bit_state_dict()
        else:
            state = self.engine.module.state_dict() if self.rank == 0 else None
        if self.rank == 0:
            self.engine.module.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        import torch.distributed as dist
        dist.barrier()
        return self.rank == 0

    def _save_lora(self, out_dir: str) -> bool:
        import torch.distributed as dist

        from prefopt.models.lora import adapter_state, save_adapter
        merged = self.export_weights()                                   # collective under ZeRO-3
        adapter = adapter_state(self.engine.module, self._gather())      # collective under ZeRO-3
        if self.rank == 0:
            module = self.engine.module
            module.get_base_model().save_pretrained(out_dir, state_dict=dict(merged), safe_serialization=True)
            save_adapter(module, os.path.join(out_dir, "adapter"), adapter)
        dist.barrier()
        return self.rank == 0

    def save_checkpoint(self, directory: str) -> bool:
        """Collective: DeepSpeed checkpoint (model, optimizer, scheduler) + this rank's torch RNG."""
        import torch
        self.engine.save_checkpoint(directory, tag="ds", client_state={"torch_rng": torch.get_rng_state()},
                                    save_latest=False)
        return True

    def load_checkpoint(self, directory: str) -> bool:
        """Collective: restore what ``save_checkpoint`` wrote (same number of learners, same ZeRO stage)."""
        import torch
        path, client = self.engine.load_checkpoint(directory, tag="ds", load_optimizer_states=True,
                                                   load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint under {directory}/ds")
        torch.set_rng_state(client["torch_rng"])
        return True

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()


def _nothing():
    import contextlib
    return contextlib.nullcontext()


def _numel(params) -> int:
    """Elements of ``params``, whole under ZeRO-3 too."""
    return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in params)
