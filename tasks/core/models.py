"""Model sources: a local directory, a registered `NAME[@VERSION]`, or a hub id `ID[@REVISION]`.

Every source resolves to a local directory plus fingerprints of its weights and of its tokenizer,
so cache keys change exactly when the model or tokenizer files change.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

from hfbatch.tasks.core.errors import ConfigError, ModelError
from hfbatch.tasks.core.fingerprint import hash_files
from hfbatch.tasks.core.refs import ModelRef, TrainedModel
from hfbatch.tasks.core.registry import Registry
from hfbatch.tasks.core.settings import Settings
from hfbatch.tasks.core.store import Store

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json",
                   "chat_template.jinja", "chat_template.json")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


def resolve_model(src: str, settings: Settings, store: Store | None = None, gguf_file: str | None = None
                  ) -> ModelRef:
    """Resolve a model SRC; raise `ModelError` naming it if it cannot be found or has no safe weights.
    A name registered in `store` wins over a hub id of the same spelling. A `.gguf` file, or a hub
    repository's `gguf_file`, is converted once to a model directory (`gguf_model`)."""
    path = Path(src).expanduser()
    if gguf_file:
        return _hub_gguf(src, gguf_file, settings)
    if path.is_dir():
        return local_model(src, path, settings)
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise ModelError(f"GGUF file {src!r} does not exist")
        return local_model(src, gguf_model(path, settings), settings)
    if src.startswith((".", "/", "~")):
        raise ModelError(f"model directory {src!r} does not exist")
    if store is not None:
        name, _, version = src.partition("@")
        registry = Registry(store, name) if Registry.valid_name(name) else None
        if registry is not None and registry.exists():
            v = registry.resolve(version or None)
            if not store.is_complete(registry.version_key(v)):
                raise ModelError(f"model {name} v{v}: its files ({store.uri(registry.version_key(v))}) are missing "
                                 f"or incomplete; promote or roll back to another version")
            local = store.local_dir(registry.version_key(v))
            ref = local_model(src, local, settings, registry.verify(v, local))
            return ModelRef(src, ref.path, ref.fingerprint, ref.tokenizer_fingerprint, None, name, v,
                            registry.task(v))
    try:
        return _hub_model(src, settings)
    except ModelError as e:
        if store is None or "/" in src.partition("@")[0]:
            raise
        names = Registry.names(store)
        raise ModelError(f"model {src!r} is not registered in {store.url} (registered: {names or 'none'}), "
                         f"is not a local directory, and {e.hub_problem}") from e


def gguf_model(path: Path, settings: Settings) -> Path:
    """A GGUF checkpoint (llama.cpp's format) as a transformers model directory (safetensors, dequantized),
    converted once per file content into the settings' cache (`converted/<sha256>`), so later steps and
    runs load it as fast as any model. transformers reads GGUF (the `gguf` package) but marks the loaded
    model quantized, refusing `save_pretrained`: the weights move into a model built from its config."""
    import shutil

    from hfbatch.tasks.core.fingerprint import file_sha256

    target = Path(settings.cache_dir) / "converted" / file_sha256(path)[:32]
    if (target / "model.safetensors").exists():
        return target
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"model {str(path)!r} is a GGUF file: reading it needs the gguf package (pip install gguf)")
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise ModelError(f"cannot read GGUF file {str(path)!r}: {str(e).splitlines()[0][:300]}") from e
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(loaded.state_dict(), strict=False)
    model.tie_weights()
    model.generation_config = loaded.generation_config
    staging = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    try:
        os.replace(staging, target)  # atomic: another process converting the same file may have won
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def trained_model(trained: TrainedModel, store: Store, settings: Settings) -> ModelRef:
    """The model a training run committed to `store`."""
    ref = local_model(trained.uri, store.local_dir(trained.key), settings)
    return ModelRef(ref.source, ref.path, ref.fingerprint, ref.tokenizer_fingerprint, task=trained.task)


def local_model(src: str, path: Path, settings: Settings, digests: dict[str, str] | None = None) -> ModelRef:
    """The model directory `path` checked (safe weights, no remote code unless trusted) and fingerprinted;
    `digests`: sha256 of its files already computed (`registry.file_digests`), not read again."""
    files = {p.name for p in path.iterdir()}
    weights = [f for f in SAFE_WEIGHTS if f in files]
    if not weights:
        pickled = [f for f in PICKLE_WEIGHTS if f in files]
        if pickled and not settings.allow_pickle_weights:
            raise ModelError(f"model {src!r} has only pickle weights ({pickled[0]}); convert them to "
                             "safetensors or set HFBATCH_ALLOW_PICKLE_WEIGHTS=1 if you trust the file")
        if not pickled:
            raise ModelError(f"model directory {src!r} has no weights (expected model.safetensors)")
    if "config.json" not in files:
        raise ModelError(f"model directory {src!r} has no config.json")
    if not settings.trust_remote_code:
        for name in ("config.json", "tokenizer_config.json"):
            if name in files and "auto_map" in json.loads((path / name).read_text() or "{}"):
                raise ModelError(f"model {src!r} asks to run its own Python code (auto_map in {name}); hfbatch "
                                 "refuses that unless HFBATCH_TRUST_REMOTE_CODE=1 is set for a model you trust")
    for name in sorted(files):
        if name.endswith(".safetensors"):
            check_safetensors(path / name, src)
    tok = [path / f for f in TOKENIZER_FILES if f in files]
    if not tok:
        raise ModelError(f"model directory {src!r} has no tokenizer files")
    weight_files = [path / "config.json"] + [p for p in path.iterdir() if p.name.endswith(".safetensors")
                                            or p.name.startswith("pytorch_model")]
    return ModelRef(src, str(path.resolve()), hash_files(weight_files, digests), hash_files(tok, digests))


def check_safetensors(path: Path, src: str) -> None:
    """A safetensors file is whole: its header reads as JSON and its size is what the header says (a
    truncated or torn file fails here, naming it, not inside a shard). Reads the header only."""
    try:
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            header = json.loads(f.read(size)) if 0 < size < 100_000_000 else None
        end = max((t["data_offsets"][1] for k, t in (header or {}).items() if k != "__metadata__"), default=0)
        whole = header is not None and path.stat().st_size == 8 + size + end
    except (ValueError, KeyError, TypeError, IndexError, UnicodeDecodeError):
        whole = False
    if not whole:
        raise ModelError(f"model {src!r}: {path} is truncated or damaged (its size does not match its safetensors "
                         "header); copy or train the model again")


def _hub_gguf(src: str, gguf_file: str, settings: Settings) -> ModelRef:
    """The GGUF file `gguf_file` of hub repository `src` (`ID[@REVISION]`), fetched and converted."""
    from huggingface_hub import hf_hub_download

    repo, _, revision = src.partition("@")
    try:
        local = Path(hf_hub_download(repo, gguf_file, revision=revision or None))
    except Exception as e:
        raise ModelError(f"GGUF file {gguf_file!r} of {src!r} cannot be fetched from the Hugging Face Hub "
                         f"({str(e).splitlines()[0][:200]})") from e
    return local_model(f"{src}:{gguf_file}", gguf_model(local, settings), settings)


def _hub_model(src: str, settings: Settings) -> ModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo, _, revision = src.partition("@")
    try:
        local = snapshot_download(repo, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except HFValidationError as e:
        raise ModelError(f"model {src!r} is neither a local directory, a registered model nor a hub id",
                         hub_problem="is not a valid hub id") from e
    except Exception as e:
        problem = f"cannot be fetched from the Hugging Face Hub ({str(e).splitlines()[0][:200]})"
        raise ModelError(f"model {src!r} {problem}", hub_problem=problem) from e
    ref = local_model(src, Path(local), settings)
    return ModelRef(src, ref.path, ref.fingerprint, ref.tokenizer_fingerprint, Path(local).name)


def label_names(model: ModelRef) -> tuple[str, ...]:
    """The class names in the model's config (`id2label`), in id order."""
    config = json.loads((Path(model.path) / "config.json").read_text())
    id2label = {int(k): v for k, v in (config.get("id2label") or {}).items()}
    return tuple(id2label[i] for i in range(len(id2label)))


def pick_device(wanted: str = "auto") -> tuple[str, str]:
    """(`cuda`|`cpu`, `bf16`|`fp16`|`fp32`) as `wanted` (`auto`, `cpu`, `cuda`) asks: `auto` takes CUDA
    when present; mixed precision only where the hardware has it."""
    import torch

    if wanted not in ("auto", "cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {wanted!r}")
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' (HFBATCH_DEVICE=cuda) was asked for, but torch sees no CUDA device")
    if wanted != "cpu" and torch.cuda.is_available():
        return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "cpu", "fp32"


def model_kwargs(settings: Settings) -> dict:
    """`from_pretrained` arguments of the settings' loading policy (safetensors only, no remote code)."""
    return dict(use_safetensors=not settings.allow_pickle_weights, trust_remote_code=settings.trust_remote_code)


def load_tokenizer(model: ModelRef, settings: Settings):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.path, use_fast=True, trust_remote_code=settings.trust_remote_code)


def load_model(model: ModelRef, auto_class: str, settings: Settings, **kwargs):
    """`transformers.<auto_class>.from_pretrained` of `model` under the settings' loading policy."""
    import transformers

    return getattr(transformers, auto_class).from_pretrained(model.path, **model_kwargs(settings), **kwargs)
