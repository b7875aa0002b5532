"""Keye-VL-2.0-30B-A3B in PyTorch: config, modules, paged caches, checkpoint I/O and generation."""

from keye.model.cache import (CacheFullError, CacheStep, MemoryPlan, PagedKVCache, parameter_count,
                              plan_memory)
from keye.model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from keye.model.config import KeyeConfig, VisionConfig, keye_vl_2_30b_a3b, tiny_config
from keye.model.generate import GenerationRequest, GenerationResult, generate, sample
from keye.model.keye_vl import KeyeVL

__all__ = ["KeyeConfig", "VisionConfig", "keye_vl_2_30b_a3b", "tiny_config", "KeyeVL", "PagedKVCache",
           "CacheStep", "CacheFullError", "MemoryPlan", "plan_memory", "parameter_count", "load_checkpoint",
           "save_checkpoint", "CheckpointError", "GenerationRequest", "GenerationResult", "generate", "sample"]
