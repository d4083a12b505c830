"""Model sources: a local directory, a registered `NAME[@VERSION]`, or a hub id `ID[@REVISION]`.

Every source resolves to a local directory plus fingerprints of its weights and of its tokenizer,
so cache keys change exactly when the model or tokenizer files change.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import ConfigError, ModelError
from .fingerprint import hash_files
from .settings import get_settings
from .store import Store

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt",
                   "merges.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model", "added_tokens.json")
SAFE_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLE_WEIGHTS = ("pytorch_model.bin", "pytorch_model.bin.index.json")
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: where its files are on this machine and what identifies them."""

    source: str
    path: str
    fingerprint: str
    tokenizer_fingerprint: str
    revision: str | None = None
    name: str | None = None
    version: str | None = None


def resolve_model(src: str, store: Store | None = None) -> ModelRef:
    """Resolve a model SRC; raise `ModelError` naming it if it cannot be found or has no safe weights."""
    path = Path(src).expanduser()
    if path.is_dir():
        return _local_ref(src, path)
    if src.startswith((".", "/", "~")):
        raise ModelError(f"model directory {src!r} does not exist")
    if store is not None:
        from .registry import Registry

        name, _, version = src.partition("@")
        registry = Registry(store, name)
        if registry.exists():
            v = registry.resolve(version or None)
            local = store.local_dir(registry.version_key(v))
            ref = _local_ref(src, local)
            return ModelRef(src, ref.path, ref.fingerprint, ref.tokenizer_fingerprint, None, name, v)
    return _hub_ref(src)


def _local_ref(src: str, path: Path) -> ModelRef:
    files = {p.name for p in path.iterdir()}
    weights = [f for f in SAFE_WEIGHTS if f in files]
    if not weights:
        pickled = [f for f in PICKLE_WEIGHTS if f in files]
        if pickled and not get_settings().allow_pickle_weights:
            raise ModelError(f"model {src!r} has only pickle weights ({pickled[0]}); convert them to "
                             "safetensors or set HFBATCH_ALLOW_PICKLE_WEIGHTS=1 if you trust the file")
        if not pickled:
            raise ModelError(f"model directory {src!r} has no weights (expected model.safetensors)")
        weights = pickled
    if "config.json" not in files:
        raise ModelError(f"model directory {src!r} has no config.json")
    tok = [path / f for f in TOKENIZER_FILES if f in files]
    if not tok:
        raise ModelError(f"model directory {src!r} has no tokenizer files")
    weight_files = [path / "config.json"] + [p for p in path.iterdir() if p.name.endswith(".safetensors")
                                            or p.name.startswith("pytorch_model")]
    return ModelRef(src, str(path.resolve()), hash_files(weight_files), hash_files(tok))


def _hub_ref(src: str) -> ModelRef:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    repo, _, revision = src.partition("@")
    try:
        local = snapshot_download(repo, revision=revision or None, allow_patterns=HUB_PATTERNS)
    except HFValidationError as e:
        raise ModelError(f"model {src!r} is neither a local directory, a registered model nor a hub id") from e
    except Exception as e:
        raise ModelError(f"cannot fetch model {src!r} from the Hugging Face Hub: {e}") from e
    ref = _local_ref(src, Path(local))
    return ModelRef(src, ref.path, ref.fingerprint, ref.tokenizer_fingerprint, Path(local).name)


def pick_device() -> tuple[str, str]:
    """(`cuda`|`cpu`, `bf16`|`fp16`|`fp32`) as `HFBATCH_DEVICE` asks (default: CUDA when present);
    mixed precision only where the hardware has it."""
    import torch

    wanted = get_settings().device
    if wanted == "cuda" and not torch.cuda.is_available():
        raise ConfigError("HFBATCH_DEVICE=cuda, but torch sees no CUDA device")
    if wanted != "cpu" and torch.cuda.is_available():
        return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "cpu", "fp32"


def load_tokenizer(model: ModelRef):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model.path, use_fast=True,
                                         trust_remote_code=get_settings().trust_remote_code)


def load_classifier(model: ModelRef, label_names: tuple[str, ...] | None = None):
    """A sequence-classification model; with `label_names`, a head of that size (new if needed)."""
    from transformers import AutoModelForSequenceClassification

    settings = get_settings()
    kwargs = {}
    if label_names is not None:
        kwargs = dict(num_labels=len(label_names), id2label=dict(enumerate(label_names)),
                      label2id={n: i for i, n in enumerate(label_names)}, ignore_mismatched_sizes=True)
    return AutoModelForSequenceClassification.from_pretrained(
        model.path, use_safetensors=not settings.allow_pickle_weights,
        trust_remote_code=settings.trust_remote_code, **kwargs)
