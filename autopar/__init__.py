"""autopar: an automatic parallelization planner for PyTorch.

    graph = autopar.capture(model, example_inputs)
    plan = autopar.plan(model, example_inputs, cluster=autopar.Cluster.preset("dgx-h100", nodes=4),
                        global_batch_size=512)
    pm = autopar.parallelize(model, example_inputs, plan=plan)   # inside torchrun

Heavy submodules (torch, torch.distributed, pulp) load on first use, so
``import autopar`` stays fast.
"""

from __future__ import annotations

from autopar._modules import lazy_attributes
from autopar.errors import (
    AutoparError,
    CaptureError,
    CheckpointError,
    ClusterSpecError,
    ExportError,
    InfeasiblePlanError,
    PlanValidationError,
    UserInputError,
)

__version__ = "0.1.0"

# public name -> module that defines it, imported on first attribute access (PEP 562)
_LAZY: dict[str, str] = {
    "capture": "autopar.capture",
    "OpGraph": "autopar.graph.ir",
    "Layer": "autopar.graph.ir",
    "Op": "autopar.graph.ir",
    "Plan": "autopar.plan",
    "Layout": "autopar.layout",
    "Pins": "autopar.layout",
    "Runtime": "autopar.layout",
    "PlanOptions": "autopar.api",
    "Cluster": "autopar.cost_models.cluster",
    "plan": "autopar.api",
    "plan_ranked": "autopar.api",
    "parallelize": "autopar.api",
    "replan": "autopar.replanning",
}


__getattr__, __dir__ = lazy_attributes(__name__, _LAZY)

__all__ = [
    "AutoparError",
    "CaptureError",
    "CheckpointError",
    "ClusterSpecError",
    "ExportError",
    "InfeasiblePlanError",
    "PlanValidationError",
    "UserInputError",
    *_LAZY,
]
