"""Pipeline parallelism: one model cut into stages, one stage per process, on torch.distributed.

``stages`` plans the cut (pure, from sizes and each process's budgets); ``view`` shows the model as one
stage so the single-process planner, loader and dispatch handle exactly that stage; ``world``,
``faults`` and ``channel`` are the processes, their failures and their messages; ``runtime`` runs one
stage inside the model's own forward; ``pipeline`` is one rank's handle; ``launch`` sets it all up
(``load_stage`` for plain models; ``load_pretrained_dispatched(..., pipeline=True)`` for Hugging Face ones).
"""

from .launch import load_stage
from .pipeline import Pipeline
from .stages import StagePlan, Unit, fast_capacity, plan_stages, stage_device_map
from .view import stage_only

__all__ = ["Pipeline", "StagePlan", "Unit", "fast_capacity", "load_stage", "plan_stages", "stage_device_map",
           "stage_only"]
