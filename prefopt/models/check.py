"""Check on the driver, before Ray starts, that a model path will load, and say why not.

:func:`check_model` reads only file listings, ``config.json``, safetensors headers and the
tokenizer; it never loads weights (the builtin tiny model checks in well under a second once its
tokenizer is built). Every problem is a :class:`~prefopt.errors.ConfigError` that names the recipe
key (``model.path``, ``roles.critic.path``, ``roles.reward.sources[0].model`` ...), the path, and
what to do about it, so the CLI prints one line instead of a worker's traceback minutes later.
"""
from __future__ import annotations

import importlib.util
import json
import os
import re
from pathlib import Path

from prefopt.errors import ConfigError, did_you_mean
from prefopt.models.tiny import BUILTIN_MODELS, BUILTIN_PREFIX, resolve_model_path

HEADS = {
    # head -> (transformers auto class, its model_type -> class mapping in transformers.models.auto)
    "causal_lm": ("AutoModelForCausalLM", "MODEL_FOR_CAUSAL_LM_MAPPING_NAMES"),
    "sequence_classification": ("AutoModelForSequenceClassification",
                                "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES"),
    "token_classification": ("AutoModelForTokenClassification",
                             "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES"),
}
ATTN_IMPLEMENTATIONS = ("sdpa", "eager", "flash_attention_2", "flash_attention_3", "flex_attention")
# attn_implementation -> (module that provides it, pip distribution)
FLASH_PACKAGES = {"flash_attention_2": ("flash_attn", "flash-attn"),
                  "flash_attention_3": ("flash_attn_interface", "flash-attn-3")}
# Files from which AutoTokenizer can build a tokenizer (any one suffices for the friendly check;
# AutoTokenizer itself is the real test).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json", "vocab.txt",
                   "merges.txt", "spiece.model", "sentencepiece.bpe.model", "tokenizer.tiktoken")
PICKLED_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFE_WEIGHTS, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
_TRUE = {"1", "on", "yes", "true"}
_MAX_HEADER = 100 * 2 ** 20   # safetensors caps its JSON header at 100 MB


def check_model(path: str, *, tokenizer: str | None = None, trust_remote_code: bool = False,
                attn_implementation: str = "sdpa", what: str = "model.path", head: str = "causal_lm") -> str:
    """Check that the model at ``path`` (the value of recipe key ``what``) will load with ``head``
    (``causal_lm``: policy/reference, ``sequence_classification``: reward models,
    ``token_classification``: critic) and return its resolved path.

    Returns an absolute local folder for ``builtin:`` names, local folders and (offline) hub names
    found in the hub cache (their snapshot folder); with network allowed, a hub name that is not
    cached is returned unchanged and left to load time. Raises :class:`ConfigError` naming ``what``
    (or ``model.tokenizer`` / ``model.trust_remote_code`` / ``model.attn_implementation``) when the
    folder has no config.json or no safetensors weights (or missing / truncated shards), the name is
    neither a folder, a builtin nor a valid (offline: cached) hub name, the config needs
    ``trust_remote_code`` or has no ``head`` class, the tokenizer is missing or does not load (not
    checked for ``token_classification`` unless ``tokenizer`` is given), or ``attn_implementation``
    is unknown or cannot run here.
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    local, shown = _resolve(path, what)
    if local is not None:
        _check_weights(local, shown, what, head)
        config = _check_config(local, shown, what, head, trust_remote_code)
    else:
        config = None
    if tokenizer is not None or head != "token_classification":
        _check_tokenizer(local, shown, tokenizer, what, trust_remote_code, config)
    _check_attention(attn_implementation)
    return str(local) if local is not None else path


# ---------------------------------------------------------------------------------------------
# path resolution

def _builtin_names() -> list[str]:
    return [BUILTIN_PREFIX + name for name in BUILTIN_MODELS]


def _builtins_hint(name: str) -> str:
    return f"{did_you_mean(name, _builtin_names())}; builtin models: {', '.join(_builtin_names())}"


def _offline() -> bool:
    return any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"))


def _looks_builtin(name: str) -> bool:
    """A near miss of ``builtin:<name>``: ``bultin:...``, ``builtins:...``, ``builtin-...``, or a
    bare builtin name (``tiny-llama``, ``tiny-lama``)."""
    first = re.split(r"[:/_\-]", name.lower(), maxsplit=1)[0]
    if ":" in name or _close(first, ["builtin"], 0.8):
        return True
    return "/" not in name and _close(name.lower(), BUILTIN_MODELS, 0.8) is not None


def _close(name: str, candidates, cutoff: float) -> str | None:
    import difflib
    matches = difflib.get_close_matches(name, list(candidates), n=1, cutoff=cutoff)
    return matches[0] if matches else None


def _resolve(path, what: str) -> tuple[Path | None, str]:
    """(local folder or None for an uncached hub name with network allowed, how to show it)."""
    if not isinstance(path, str) or not path.strip():
        raise ConfigError(f"{what} is empty: give a local model folder, a hub name 'org/name', "
                          f"or {' / '.join(_builtin_names())}")
    if path.startswith(BUILTIN_PREFIX):
        name = path[len(BUILTIN_PREFIX):]
        if name not in BUILTIN_MODELS:
            raise ConfigError(f"{what}: unknown builtin model '{path}'{_builtins_hint(path)}")
        folder = Path(resolve_model_path(path))
        return folder, f"{path} ({folder})"
    local = Path(path).expanduser()
    if path.startswith(("/", "./", "../", "~")) or path in (".", "..") or local.exists():
        if not local.exists():
            raise ConfigError(f"{what}: model folder '{path}' does not exist")
        if not local.is_dir():
            raise ConfigError(f"{what}: '{path}' is a file; a model folder (config.json, safetensors "
                              f"weights, tokenizer) was expected")
        folder = Path(os.path.abspath(local))
        return folder, (path if str(folder) == path else f"{path} ({folder})")

    from huggingface_hub.utils import HFValidationError, validate_repo_id
    try:
        validate_repo_id(path)
    except HFValidationError:
        raise ConfigError(f"{what}: '{path}' is not a local folder, not a builtin model and not a "
                          f"valid hub name ('org/name'){_builtins_hint(path)}") from None
    if _offline():
        from huggingface_hub import constants, try_to_load_from_cache
        cached = try_to_load_from_cache(path, "config.json")
        if isinstance(cached, str):
            folder = Path(cached).parent
            return folder, f"{path} ({folder})"
        hint = _builtins_hint(path) if _looks_builtin(path) else ""
        raise ConfigError(f"{what}: '{path}' is not a local folder and not in the hub cache "
                          f"({constants.HF_HUB_CACHE}), and HF_HUB_OFFLINE=1 forbids downloading it: download it "
                          f"where there is network (`hf download {path}`) or set {what} to a local folder{hint}")
    if _looks_builtin(path):
        raise ConfigError(f"{what}: '{path}' looks like a misspelt builtin model name{_builtins_hint(path)}")
    return None, path


# ---------------------------------------------------------------------------------------------
# files

def _model_folders_below(folder: Path, limit: int = 3, budget: int = 200) -> list[str]:
    """Up to ``limit`` folders one or two levels down that hold a config.json (a run's ``model/``,
    a checkpoint's ``hf/``), looking at no more than ``budget`` folders."""
    found: list[str] = []

    def subdirs(p: Path) -> list[Path]:
        try:
            return sorted(c for c in p.iterdir() if c.is_dir() and not c.name.startswith("."))
        except OSError:
            return []

    for sub in subdirs(folder):
        for cand in [sub, *subdirs(sub)]:
            budget -= 1
            if budget < 0:
                return found
            if (cand / "config.json").is_file():
                found.append(str(cand))
                if len(found) >= limit:
                    return found
    return found


def _check_weights(folder: Path, shown: str, what: str, head: str) -> None:
    try:
        files = {p.name for p in folder.iterdir() if p.is_file()}
    except OSError as e:
        raise ConfigError(f"{what}: cannot list model folder {shown}: {e}") from None
    if "config.json" not in files:
        below = _model_folders_below(folder)
        hint = (f"; model folders below it: {', '.join(below)}" if below else
                f"; a model folder (HF save_pretrained output), a hub name 'org/name' or one of "
                f"{', '.join(_builtin_names())} was expected")
        raise ConfigError(f"{what}: {shown} has no config.json, so it is not an HF model folder{hint}")

    auto_class = HEADS[head][0]
    convert = (f"convert a checkpoint you trust once: `{auto_class}.from_pretrained(dir, use_safetensors=False)"
               f".save_pretrained(dir, safe_serialization=True)` (model.save_pretrained(dir, "
               f"safe_serialization=True))")
    if SAFE_INDEX in files:
        try:
            index = json.loads((folder / SAFE_INDEX).read_text())
            shards = sorted(set(index["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ConfigError(f"{what}: {folder / SAFE_INDEX} is not a valid safetensors index "
                              f"(a 'weight_map' of tensor -> shard file): {_first_line(e)}") from None
        missing = [s for s in shards if not (folder / s).is_file()]
        if missing:
            listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise ConfigError(f"{what}: {folder / SAFE_INDEX} lists {len(shards)} shard(s) but "
                              f"{len(missing)} {'is' if len(missing) == 1 else 'are'} missing: {listed} "
                              f"(an incomplete download or copy)")
        for shard in shards:
            _check_safetensors(folder / shard, what)
        return
    if SAFE_WEIGHTS in files:
        _check_safetensors(folder / SAFE_WEIGHTS, what)
        return
    if "adapter_config.json" in files:
        raise ConfigError(f"{what}: {shown} is a PEFT adapter (adapter_config.json) without full model weights: "
                          f"merge it into its base model and save that (`peft_model.merge_and_unload()"
                          f".save_pretrained(dir, safe_serialization=True)`)")
    other = sorted(f for f in files if f.endswith(".safetensors"))
    if other:
        raise ConfigError(f"{what}: {shown} has {', '.join(other[:3])} but neither {SAFE_WEIGHTS} nor "
                          f"{SAFE_INDEX}, the names transformers loads; re-save it with "
                          f"model.save_pretrained(dir, safe_serialization=True)")
    pickled = sorted(f for f in files if f.endswith(PICKLED_SUFFIXES) or f == "pytorch_model.bin.index.json")
    if pickled:
        raise ConfigError(f"{what}: {shown} has only pickled weights ({', '.join(pickled[:3])}) and no "
                          f"safetensors weights: prefopt loads safetensors only (unpickling a checkpoint can "
                          f"run arbitrary code); {convert}")
    raise ConfigError(f"{what}: {shown} has no model weights ({SAFE_WEIGHTS} or {SAFE_INDEX}); "
                      f"save the model there with model.save_pretrained(dir, safe_serialization=True)")


def _check_safetensors(file: Path, what: str) -> None:
    """The header of a safetensors file parses and the file is as long as the header says
    (catches git-lfs pointers, truncated copies and other non-safetensors files)."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            first = f.read(8)
            n = int.from_bytes(first, "little") if len(first) == 8 else -1
            if first.startswith(b"version "):
                raise ConfigError(f"{what}: {file} is a git-lfs pointer, not the weights: run "
                                  f"`git lfs pull` in the folder (or download the checkpoint again)")
            if n < 2 or n > _MAX_HEADER or 8 + n > size:
                raise ConfigError(f"{what}: {file} is not a safetensors file (empty, truncated or "
                                  f"another format; {size} bytes)")
            header = json.loads(f.read(n))
    except OSError as e:
        raise ConfigError(f"{what}: cannot read {file}: {e}") from None
    except ValueError:
        raise ConfigError(f"{what}: {file} is not a safetensors file (its header is not JSON)") from None
    try:
        end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    except (AttributeError, KeyError, TypeError, IndexError):
        raise ConfigError(f"{what}: {file} has a malformed safetensors header") from None
    if 8 + n + end > size:
        raise ConfigError(f"{what}: {file} is truncated ({size} bytes; its header describes "
                          f"{8 + n + end}): copy or download it again")


# ---------------------------------------------------------------------------------------------
# config.json

def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _check_config(folder: Path, shown: str, what: str, head: str, trust_remote_code: bool) -> dict:
    import transformers
    from transformers.models.auto import modeling_auto
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    try:
        cfg = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{what}: {folder / 'config.json'} cannot be read as JSON: {_first_line(e)}") from None
    if not isinstance(cfg, dict):
        raise ConfigError(f"{what}: {folder / 'config.json'} is not a JSON object")
    auto_class, mapping_name = HEADS[head]
    model_type = cfg.get("model_type")
    auto_map = cfg.get("auto_map") if isinstance(cfg.get("auto_map"), dict) else {}
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING_NAMES
    remote = f"config.json auto_map: {auto_class} -> {auto_map[auto_class]}" if auto_class in auto_map else None

    if not known:
        if not auto_map:
            what_type = "has no model_type" if model_type is None else (
                f"has model_type '{model_type}', unknown to transformers {transformers.__version__}"
                f"{did_you_mean(str(model_type), CONFIG_MAPPING_NAMES)}")
            raise ConfigError(f"{what}: {folder / 'config.json'} {what_type}, and no auto_map to load code shipped "
                              f"with the checkpoint; fix model_type or upgrade transformers")
        if not trust_remote_code:
            raise ConfigError(f"{what}: {shown} needs model.trust_remote_code: true: its model_type "
                              f"'{model_type}' is not in transformers {transformers.__version__} and config.json's "
                              f"auto_map points at code shipped with the checkpoint "
                              f"({', '.join(f'{k} -> {v}' for k, v in auto_map.items())}); prefopt runs no "
                              f"checkpoint code unless the recipe sets model.trust_remote_code: true (only do "
                              f"so for a checkpoint you trust)")
        for key in ("AutoConfig", auto_class):
            if key not in auto_map:
                raise ConfigError(f"{what}: {folder / 'config.json'}'s auto_map has no {key} entry (it has "
                                  f"{', '.join(auto_map)}), so transformers cannot build "
                                  f"{'its config' if key == 'AutoConfig' else f'a {head} model'} from it")
            _check_code_file(folder, shown, what, key, auto_map[key])
    elif remote is not None and not trust_remote_code and model_type not in getattr(modeling_auto, mapping_name):
        raise ConfigError(f"{what}: {shown} needs model.trust_remote_code: true: transformers has no {auto_class} "
                          f"for model_type '{model_type}', only the checkpoint's own code ({remote}); set "
                          f"model.trust_remote_code: true only for a checkpoint you trust")

    from transformers import AutoConfig
    try:
        AutoConfig.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - any failure here is a bad checkpoint, reported in one line
        hint = (" (set model.trust_remote_code: true for a checkpoint you trust)"
                if "trust_remote_code" in str(e) and not trust_remote_code else "")
        raise ConfigError(f"{what}: transformers cannot read {folder / 'config.json'}: "
                          f"{_first_line(e)}{hint}") from None

    if known and model_type not in getattr(modeling_auto, mapping_name) and remote is None:
        kinds = {"causal_lm": "causal LM", "sequence_classification": "sequence-classification (reward) model",
                 "token_classification": "token-classification (value) model"}
        raise ConfigError(f"{what}: {shown} has model_type '{model_type}', for which transformers has no "
                          f"{auto_class}: it cannot be used as a {kinds[head]}")
    if head == "sequence_classification":
        archs = [a for a in (cfg.get("architectures") or []) if isinstance(a, str)]
        if archs and not any(a.endswith("ForSequenceClassification") or "Reward" in a for a in archs):
            raise ConfigError(f"{what}: {shown} is not a reward (sequence-classification) model: its architectures "
                              f"are {', '.join(archs)}, so its score head would be freshly initialized (random "
                              f"rewards); use a checkpoint saved from an *ForSequenceClassification model")
    return cfg


def _check_code_file(folder: Path, shown: str, what: str, key: str, ref) -> None:
    """The module that auto_map[key] names ("module.Class", or "repo--module.Class" from another
    repo) exists in the folder."""
    if isinstance(ref, (list, tuple)):
        ref = next((r for r in ref if r), None)
    if not isinstance(ref, str) or "--" in ref:
        return
    module = ref.rsplit(".", 1)[0]
    file = module.replace(".", "/") + ".py"
    if not (folder / file).is_file():
        raise ConfigError(f"{what}: {folder / 'config.json'}'s auto_map names {key} -> {ref}, but {file} is not in "
                          f"the folder")


# ---------------------------------------------------------------------------------------------
# tokenizer

def _check_tokenizer(model_folder: Path | None, shown: str, tokenizer: str | None, what: str,
                     trust_remote_code: bool, config: dict | None) -> None:
    key = "model.tokenizer"
    if tokenizer is not None:
        folder, tok_shown = _resolve(tokenizer, key)
        where = key
    else:
        folder, tok_shown, where = model_folder, shown, what
    if folder is None:     # a hub name with network allowed: left to load time
        return
    try:
        names = {p.name for p in folder.iterdir()}
    except OSError as e:
        raise ConfigError(f"{where}: cannot list tokenizer folder {tok_shown}: {e}") from None
    if not (names & set(TOKENIZER_FILES) or any(n.endswith(".tiktoken") for n in names)):
        files = ", ".join(TOKENIZER_FILES[:4])
        if tokenizer is not None:
            raise ConfigError(f"{key}: {tok_shown} has no tokenizer files ({files}, ...)")
        fix = ("set model.tokenizer to the folder or hub name of its tokenizer" if what == "model.path" else
               "save its tokenizer into the folder (tokenizer.save_pretrained(dir)); model.tokenizer "
               "applies to model.path only")
        raise ConfigError(f"{what}: {shown} has no tokenizer files ({files}, ...) and model.tokenizer is not "
                          f"set: {fix}")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - reported in one line
        hint = (" (set model.trust_remote_code: true for a tokenizer you trust)"
                if "trust_remote_code" in str(e) and not trust_remote_code else "")
        raise ConfigError(f"{where}: AutoTokenizer cannot load the tokenizer in {tok_shown}: "
                          f"{_first_line(e)}{hint}") from None
    if tokenizer is not None and config is not None:
        vocab = config.get("vocab_size") or (config.get("text_config") or {}).get("vocab_size")
        if isinstance(vocab, int) and len(tok) > vocab:
            raise ConfigError(f"{key}: {tok_shown} has {len(tok)} tokens but {what} {shown} has vocab_size "
                              f"{vocab}: token ids >= {vocab} would index past its embedding; use the "
                              f"model's own tokenizer")


# ---------------------------------------------------------------------------------------------
# attention

def _has_module(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def _check_attention(attn_implementation: str) -> None:
    key = "model.attn_implementation"
    if attn_implementation not in ATTN_IMPLEMENTATIONS:
        # ties go to the earlier (more common) value: 'flash_attention' -> flash_attention_2
        import difflib
        ratios = [difflib.SequenceMatcher(None, str(attn_implementation), c).ratio() for c in ATTN_IMPLEMENTATIONS]
        best = max(range(len(ratios)), key=lambda i: (ratios[i], -i))
        hint = f" (did you mean '{ATTN_IMPLEMENTATIONS[best]}'?)" if ratios[best] >= 0.5 else ""
        raise ConfigError(f"{key}: unknown attention implementation '{attn_implementation}'{hint}; "
                          f"valid: {', '.join(ATTN_IMPLEMENTATIONS)}")
    if attn_implementation not in FLASH_PACKAGES:
        return
    import torch
    module, dist = FLASH_PACKAGES[attn_implementation]
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: {attn_implementation} needs a CUDA GPU and torch sees none here; "
                          f"use model.attn_implementation: sdpa")
    if not _has_module(module):
        raise ConfigError(f"{key}: {attn_implementation} needs the {dist} package ({module}), which is not "
                          f"installed; install it or use model.attn_implementation: sdpa")
