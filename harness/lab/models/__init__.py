"""Base models by name: local directories, Hugging Face ids already on disk, fixtures."""

from harness.lab.models.base import (
    ModelNotFound,
    NotDownloaded,
    base_fingerprint,
    check_base,
    load_model,
    load_tokenizer,
    resolve_base,
)

__all__ = [
    "ModelNotFound",
    "NotDownloaded",
    "base_fingerprint",
    "check_base",
    "load_model",
    "load_tokenizer",
    "resolve_base",
]
