"""Schedulers of ldm (diffusers ``SchedulerMixin``/``ConfigMixin``)."""

from .progressive_distillation import ProgressiveDistillationScheduler

__all__ = ["ProgressiveDistillationScheduler"]
