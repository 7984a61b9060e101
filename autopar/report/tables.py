"""Terminal tables: the ranked plans as a rich table, and the cluster presets."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from autopar.plan import Plan
from autopar.report.text import RANKED_HEADERS, format_table, ranked_rows

if TYPE_CHECKING:
    from rich.table import Table

    from autopar.cost_models.cluster import Cluster


def ranked_table(plans: Sequence[Plan]) -> Table:
    """The ranked plans as a rich table (the terminal form of ``text.format_ranked``)."""
    from rich.markup import escape
    from rich.table import Table

    first = plans[0]
    table = Table(title=f"{escape(first.model_name)} on {escape(first.cluster_name)}, global batch "
                        f"{first.layout.global_batch_size}, seq {first.seq_len}")
    for i, header in enumerate(RANKED_HEADERS):
        table.add_column(header, justify="left" if i == 1 else "right", no_wrap=True)
    for row in ranked_rows(plans):
        table.add_row(*(escape(getattr(row, f.name)) for f in dataclasses.fields(row)))
    return table


def cluster_dict(c: Cluster) -> dict[str, Any]:
    """The JSON form ``autopar clusters --json`` prints for one preset (see docs/cli-json.md)."""
    bf16 = c.gpu.peak_flops_per_s.get("bfloat16")
    return {
        "name": c.name, "description": c.description, "gpu": c.gpu.name, "gpus_per_node": c.gpus_per_node,
        "gpu_mem_bytes": c.gpu.mem_bytes, "peak_bf16_tflops": bf16 / 1e12 if bf16 else None,
        "peak_flops_per_s": dict(c.gpu.peak_flops_per_s), "mem_bytes_per_s": c.gpu.mem_bytes_per_s,
        "intra_node": _link(c.intra_node), "inter_node": _link(c.inter_node), "host_mem_bytes": c.host_mem_bytes,
    }


def _link(link: Any) -> dict[str, Any]:
    return {"kind": link.kind.value, "bytes_per_s": link.bytes_per_s, "latency_s": link.latency_s}


def format_clusters(clusters: Sequence[Cluster]) -> str:
    """One line per cluster: GPU, GPUs per node, memory, peak bf16, links (per GPU, per direction)."""
    rows = []
    for c in clusters:
        bf16 = c.gpu.peak_flops_per_s.get("bfloat16")
        rows.append([c.name, c.gpu.name, str(c.gpus_per_node), f"{c.gpu.mem_bytes / 2**30:.0f}",
                     f"{bf16 / 1e12:.0f}" if bf16 else "-",
                     f"{c.intra_node.kind.value} {c.intra_node.bytes_per_s / 1e9:.0f} GB/s",
                     f"{c.inter_node.kind.value} {c.inter_node.bytes_per_s * 8 / 1e9:.0f} Gb/s"])
    headers = ["preset", "GPU", "GPUs/node", "GiB", "bf16 TFLOP/s", "intra-node (per GPU)", "inter-node (per GPU)"]
    return format_table(headers, rows, right=[False, False, True, True, True, False, False], indent="")


__all__ = ["cluster_dict", "format_clusters", "ranked_table"]
