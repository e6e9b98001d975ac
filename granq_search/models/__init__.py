"""Teacher architectures (a timm-style registry), checkpoint loading and ``build_teacher``."""

from granq_search.models.checkpoint import load_checkpoint, read_state_dict
from granq_search.models.registry import ModelInfo, create_model, list_models, model_info, register_model
from granq_search.models.teacher import Teacher, build_teacher, default_cache_dir, teacher_info

__all__ = [
    "ModelInfo",
    "register_model",
    "create_model",
    "list_models",
    "model_info",
    "load_checkpoint",
    "read_state_dict",
    "Teacher",
    "build_teacher",
    "teacher_info",
    "default_cache_dir",
]
