"""A torchtitan 0.3 config registry for tests: torchtitan's own parallelism, training and AC configs.

``ConfigManager().parse_args(["--module", "tests.export.titan_registry", "--config", "autopar_check", ...])``
parses overrides with torchtitan's parser against its real config classes, without importing its
models (which need triton and a GPU stack).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torchtitan.config import ParallelismConfig, TrainingConfig
from torchtitan.distributed.activation_checkpoint import ActivationCheckpointingConfig, SelectiveAC


@dataclass
class CheckConfig:
    """The sections of ``Trainer.Config`` that autopar's export writes."""

    hf_assets_path: str = "."
    training: TrainingConfig = field(default_factory=TrainingConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    activation_checkpoint: ActivationCheckpointingConfig = field(default_factory=SelectiveAC.Config)


def autopar_check() -> CheckConfig:
    """The registry entry ``--config autopar_check``."""
    return CheckConfig()
