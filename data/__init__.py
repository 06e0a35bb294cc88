"""Labelled text for routing studies: named datasets (Hub or bundled), prompts, tokenization."""

from data.dataset_loader import DatasetLoader, LoadReport, hub_offline
from data.documents import DOMAINS, Document, renumber_documents, text_digest
from data.errors import (
    DataError,
    DatasetSizeWarning,
    HubLoadError,
    OfflineUnavailableError,
    UnknownDatasetError,
    UnknownSplitError,
)
from data.prompt_generator import CAPABILITIES, Prompt, PromptGenerator
from data.registry import (
    BUNDLED_NAMES,
    DATASET_NAMES,
    DatasetSpec,
    HubSource,
    default_registry,
)
from data.tokenization import TokenizedDataset, tokenize_documents

__all__ = [
    "BUNDLED_NAMES",
    "CAPABILITIES",
    "DATASET_NAMES",
    "DOMAINS",
    "DataError",
    "DatasetLoader",
    "DatasetSizeWarning",
    "DatasetSpec",
    "Document",
    "HubLoadError",
    "HubSource",
    "LoadReport",
    "OfflineUnavailableError",
    "Prompt",
    "PromptGenerator",
    "TokenizedDataset",
    "UnknownDatasetError",
    "UnknownSplitError",
    "default_registry",
    "hub_offline",
    "renumber_documents",
    "text_digest",
    "tokenize_documents",
]
