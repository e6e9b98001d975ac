"""Teacher architectures: the built-in registry, your own factories by import path
(``model.name: MODULE:FACTORY`` with :func:`model_factory`), checkpoint loading and
``build_teacher``."""

from granq_search.models.checkpoint import load_checkpoint, read_state_dict
from granq_search.models.registry import create_model, list_models, model_entry_for, model_info
from granq_search.models.spec import ModelEntry, ModelInfo, model_factory
from granq_search.models.teacher import Teacher, build_teacher, default_cache_dir, teacher_info

__all__ = [
    "ModelInfo",
    "ModelEntry",
    "model_factory",
    "create_model",
    "list_models",
    "model_info",
    "model_entry_for",
    "load_checkpoint",
    "read_state_dict",
    "Teacher",
    "build_teacher",
    "teacher_info",
    "default_cache_dir",
]
