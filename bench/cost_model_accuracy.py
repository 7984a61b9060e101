"""Predicted vs measured forward+backward time of the example models on this machine's device.

    python bench/cost_model_accuracy.py                    # CUDA when present (bf16), else CPU (fp32)
    python bench/cost_model_accuracy.py --threads 1 --clock thread   # on a shared CPU machine

For each model the script captures the graph, measures one training step's
forward+backward on the device, and prints two predictions with their ratio to the
measurement:

- uncalibrated: the roofline model with a spec of this device measured by a quick
  probe (peak GEMM rate, copy bandwidth, op floor; ``probe_local_device``);
- calibrated: every op priced from a table profiled on this device (``profile_graph``).

Nothing is fitted to the measurement: the probe and the profile see only single ops.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass

import torch
from torch import nn

import autopar
from autopar.cost_models import estimate_layer_time, probe_local_device, profile_graph
from autopar.cost_models.cluster import GPUSpec
from autopar.cost_models.profiling.calibration import CalibrationTable
from autopar.cost_models.profiling.profiler import Clock, Statistic, Timing, time_call
from autopar.examples.gpt import GPT, GPTConfig, example_inputs
from autopar.examples.mlp import MLP, MLPConfig
from autopar.graph.ir import OpGraph

log = logging.getLogger("cost_model_accuracy")


@dataclass(frozen=True, slots=True, kw_only=True)
class Case:
    """One model at one batch size."""

    name: str
    """Row label."""
    model: nn.Module
    """The module (on CPU, fp32)."""
    inputs: torch.Tensor
    """Example input batch."""


def cases(device: torch.device) -> list[Case]:
    """The example models, sized so a step takes milliseconds to a second on the device."""
    scale = 4 if device.type == "cuda" else 1
    gpts = {
        "gpt tiny": (GPTConfig.from_name("tiny"), 8),
        "gpt h256 L2": (GPTConfig(n_layer=2, n_embd=256, n_head=8, block_size=128, vocab_size=1024), 4),
        "gpt h256 L2 (unfused)": (GPTConfig(n_layer=2, n_embd=256, n_head=8, block_size=128, vocab_size=1024,
                                            fused_attention=False), 4),
        "gpt h512 L4": (GPTConfig(n_layer=4, n_embd=512, n_head=8, block_size=256, vocab_size=4096), 4),
    }
    out = [Case(name=name, model=GPT(cfg), inputs=example_inputs(cfg, batch_size=batch * scale)[0])
           for name, (cfg, batch) in gpts.items()]
    mlp_cfg = MLPConfig(in_features=512, hidden=2048, out_features=512, n_layer=4)
    out.append(Case(name="mlp 512-2048x4", model=MLP(mlp_cfg), inputs=torch.randn(256 * scale, 512)))
    return out


def predict(graph: OpGraph, spec: GPUSpec, dtype: str, calibration: CalibrationTable | None) -> float:
    """Forward + backward seconds of one step, summed over layers."""
    times = [estimate_layer_time(layer, spec, dtype=dtype, calibration=calibration) for layer in graph.layers]
    return sum(t.forward_s + t.backward_s for t in times)


def measure(case: Case, device: torch.device, dtype: torch.dtype, timing: Timing) -> float:
    """Seconds of one forward+backward step of the real module on the device."""
    model = case.model.to(device=device, dtype=dtype).train()
    x = case.inputs.to(device=device, dtype=dtype if case.inputs.is_floating_point() else case.inputs.dtype)
    grad = torch.randn_like(model(x))

    def step() -> None:
        model.zero_grad(set_to_none=True)
        model(x).backward(grad)

    return time_call(step, device, timing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default=None, help="cuda or cpu (default: cuda if present)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--clock", choices=[c.value for c in Clock], default="wall",
                        help="CPU clock: 'thread' (CPU time, needs --threads 1) ignores other processes' load")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    dtype_name = "bfloat16" if device.type == "cuda" else "float32"
    statistic = Statistic.MIN if args.clock == Clock.THREAD.value else Statistic.MEDIAN
    timing = Timing(repeats=args.repeats, statistic=statistic, clock=Clock(args.clock))
    spec = probe_local_device(str(device), clock=args.clock)
    print(f"device {spec.name}: {spec.peak_flops(dtype_name) / 1e9:.0f} GFLOP/s {dtype_name}, "
          f"{spec.mem_bytes_per_s / 1e9:.1f} GB/s, op floor {spec.kernel_launch_s * 1e6:.1f} us, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'model':<24} {'measured ms':>11} {'roofline ms':>11} {'ratio':>6} {'calibrated ms':>13} {'ratio':>6}")
    for case in cases(device):
        graph = autopar.capture(case.model, (case.inputs,))
        table = profile_graph(graph, device=str(device), dtype=dtype_name if device.type == "cuda" else None,
                              repeats=args.repeats, statistic=statistic.value, clock=args.clock)
        measured = measure(case, device, getattr(torch, dtype_name), timing)
        roofline = predict(graph, spec, dtype_name, None)
        calibrated = predict(graph, spec, dtype_name, table)
        skipped = f"  ({len(table.skipped)} ops not profiled)" if table.skipped else ""
        print(f"{case.name:<24} {measured * 1e3:11.2f} {roofline * 1e3:11.2f} {roofline / measured:6.2f} "
              f"{calibrated * 1e3:13.2f} {calibrated / measured:6.2f}{skipped}")


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
