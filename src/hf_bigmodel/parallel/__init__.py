"""Pipeline parallelism: one model cut into stages, one stage per process, on torch.distributed.

``stages`` plans the cut (pure, from sizes and each process's budgets); ``view`` shows the model as one
stage so the single-process loader and dispatch handle exactly that stage.
"""

from .stages import StagePlan, Unit, fast_capacity, plan_stages, stage_device_map
from .view import stage_only

__all__ = ["StagePlan", "Unit", "fast_capacity", "plan_stages", "stage_device_map", "stage_only"]
