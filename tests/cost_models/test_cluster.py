"""Cluster presets, user YAML files and their validation."""

from __future__ import annotations

import doctest
import importlib
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import autopar
from autopar.cost_models.cluster import Cluster, LinkKind, list_presets
from autopar.cost_models.units import UnitKind, parse_quantity
from autopar.errors import ClusterSpecError

GiB = 2**30
REQUIRED_PRESETS = ("dgx-a100-40gb", "dgx-a100-80gb", "dgx-h100", "dgx-h200", "l40s-pcie", "v100-p3")


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "cluster.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def test_required_presets_are_listed_and_load() -> None:
    assert set(REQUIRED_PRESETS) <= set(list_presets())
    for name in list_presets():
        cluster = Cluster.preset(name, nodes=3)
        assert cluster.name == name
        assert cluster.nodes == 3 and cluster.num_gpus == 3 * cluster.gpus_per_node
        assert cluster.description


@pytest.mark.parametrize(("name", "bf16_tflops", "mem_gib", "hbm_tb_s", "intra_gb_s", "inter_gbit_s"), [
    ("dgx-a100-40gb", 312, 40, 1.555, 300, 200),
    ("dgx-a100-80gb", 312, 80, 2.039, 300, 200),
    ("dgx-h100", 989.4, 80, 3.35, 450, 400),
    ("dgx-h200", 989.4, 141, 4.8, 450, 400),
    ("l40s-pcie", 362.05, 48, 0.864, 32, 50),
])
def test_preset_figures_match_data_sheets(name: str, bf16_tflops: float, mem_gib: int, hbm_tb_s: float,
                                          intra_gb_s: float, inter_gbit_s: float) -> None:
    c = Cluster.preset(name)
    assert c.peak_flops("bfloat16") == pytest.approx(bf16_tflops * 1e12)
    assert c.gpu.mem_bytes == mem_gib * GiB
    assert c.gpu.mem_bytes_per_s == pytest.approx(hbm_tb_s * 1e12)
    assert c.intra_node.bytes_per_s == pytest.approx(intra_gb_s * 1e9)
    assert c.inter_node.bytes_per_s == pytest.approx(inter_gbit_s * 1e9 / 8)
    assert c.gpus_per_node == 8


def test_v100_p3_is_alpas_cluster() -> None:
    c = Cluster.preset("v100-p3", nodes=8)
    assert c.num_gpus == 64 and c.gpu.mem_bytes == 16 * GiB
    assert c.intra_node.kind is LinkKind.NVLINK
    assert c.inter_node.bytes_per_s * 8 * c.gpus_per_node == pytest.approx(25e9)  # 25 Gb/s per node
    assert c.peak_flops("fp16") == pytest.approx(125e12)
    with pytest.raises(ClusterSpecError, match="bfloat16"):
        c.peak_flops("bfloat16")  # V100 has no bf16 tensor cores


def test_l40s_links_are_pcie_not_nvlink() -> None:
    assert Cluster.preset("l40s-pcie").intra_node.kind is LinkKind.PCIE


def test_autopar_cluster_is_the_same_class_and_values_are_hashable() -> None:
    assert autopar.Cluster is Cluster
    a, b = Cluster.preset("dgx-h100", nodes=2), Cluster.preset("dgx-h100").with_nodes(2)
    assert a == b and hash(a) == hash(b)
    assert a != Cluster.preset("dgx-h200", nodes=2)


def test_yaml_from_preset_overrides_fields(tmp_path: Path) -> None:
    path = write(tmp_path, """
        preset: dgx-h100
        name: my-h100
        nodes: 4
        gpu:
          mem_bytes: 40 GiB
          peak_flops_per_s: {bfloat16: 500 TFLOP/s}
        inter_node:
          bytes_per_s: 200 Gb/s
    """)
    c = Cluster.from_yaml(path)
    base = Cluster.preset("dgx-h100")
    assert (c.name, c.nodes, c.num_gpus) == ("my-h100", 4, 32)
    assert c.gpu.mem_bytes == 40 * GiB
    assert c.peak_flops("bfloat16") == 500e12
    assert c.peak_flops("float32") == base.peak_flops("float32")  # other dtypes kept from the preset
    assert c.inter_node.bytes_per_s == 25e9
    assert c.inter_node.latency_s == base.inter_node.latency_s
    assert c.intra_node == base.intra_node


def test_yaml_without_preset_needs_every_field(tmp_path: Path) -> None:
    full = """
        gpus_per_node: 4
        host_mem_bytes: 512 GiB
        gpu:
          name: toy
          peak_flops_per_s: {bfloat16: 100 TFLOP/s}
          mem_bytes: 24 GiB
          mem_bytes_per_s: 1 TB/s
          matmul_efficiency: 0.8
          memory_efficiency: 0.9
          kernel_launch_s: 5 us
          half_efficiency_s: 2 us
        intra_node: {kind: pcie, bytes_per_s: 32 GB/s, latency_s: 1 us, efficiency: 0.75}
        inter_node: {kind: roce, bytes_per_s: 100 Gb/s, latency_s: 3 us, efficiency: 0.9}
    """
    c = Cluster.from_yaml(write(tmp_path, full))
    assert c.name == "cluster" and c.nodes == 1 and c.gpus_per_node == 4
    assert c.gpu.kernel_launch_s == pytest.approx(5e-6) and c.inter_node.kind is LinkKind.ROCE
    with pytest.raises(ClusterSpecError, match="inter_node.latency_s"):
        Cluster.from_yaml(write(tmp_path, full.replace("latency_s: 3 us, ", "")))
    with pytest.raises(ClusterSpecError, match="gpus_per_node"):
        Cluster.from_yaml(write(tmp_path, full.replace("gpus_per_node: 4", "")))


@pytest.mark.parametrize(("text", "key"), [
    ("preset: dgx-h100\ngpu: {mem_byte: 10 GiB}", "gpu.mem_byte"),
    ("preset: dgx-h100\nnode: 2", "node"),
    ("preset: dgx-h100\nintra_node: {bandwidth: 1 GB/s}", "intra_node.bandwidth"),
    ("preset: dgx-h100\ngpu: {peak_flops_per_s: {bf17: 1 TFLOP/s}}", "gpu.peak_flops_per_s.bf17"),
])
def test_unknown_keys_are_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ClusterSpecError, match=f"unknown key.*{key}"):
        Cluster.from_yaml(write(tmp_path, text))


@pytest.mark.parametrize(("text", "key"), [
    ("gpu: {mem_bytes: 0}", "gpu.mem_bytes"),
    ("gpu: {mem_bytes: -3 GiB}", "gpu.mem_bytes"),
    ("gpu: {peak_flops_per_s: {bfloat16: 0}}", "gpu.peak_flops_per_s.bfloat16"),
    ("inter_node: {latency_s: -1 us}", "inter_node.latency_s"),
    ("intra_node: {efficiency: 1.5}", "intra_node.efficiency"),
    ("nodes: 0", "nodes"),
    ("gpus_per_node: 2.5", "gpus_per_node"),
    ("host_mem_bytes: 0", "host_mem_bytes"),
])
def test_non_positive_and_out_of_range_values_are_named(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ClusterSpecError, match=key):
        Cluster.from_yaml(write(tmp_path, "preset: dgx-a100-80gb\n" + text))


def test_bad_files_and_names(tmp_path: Path) -> None:
    with pytest.raises(ClusterSpecError, match="unknown cluster preset 'dgx-z9'"):
        Cluster.preset("dgx-z9")
    with pytest.raises(ClusterSpecError, match="preset"):
        Cluster.from_yaml(write(tmp_path, "preset: dgx-z9"))
    with pytest.raises(ClusterSpecError, match="not valid YAML"):
        Cluster.from_yaml(write(tmp_path, "gpu: [unclosed"))
    with pytest.raises(ClusterSpecError, match="mapping"):
        Cluster.from_yaml(write(tmp_path, "- a list"))
    with pytest.raises(ClusterSpecError, match="cannot read"):
        Cluster.from_yaml(tmp_path / "missing.yaml")
    with pytest.raises(ClusterSpecError, match="intra_node.kind"):
        Cluster.from_yaml(write(tmp_path, "preset: dgx-h100\nintra_node: {kind: carrier-pigeon}"))


def test_units_parse_and_refuse_the_wrong_family() -> None:
    assert parse_quantity("400 Gb/s", UnitKind.BYTES_PER_S, key="k") == 50e9
    assert parse_quantity("3.35 TB/s", UnitKind.BYTES_PER_S, key="k") == pytest.approx(3.35e12)
    assert parse_quantity("80 GiB", UnitKind.BYTES, key="k") == 80 * GiB
    assert parse_quantity("989.4 TFLOP/s", UnitKind.FLOPS_PER_S, key="k") == pytest.approx(989.4e12)
    assert parse_quantity("2.7 us", UnitKind.SECONDS, key="k") == pytest.approx(2.7e-6)
    assert parse_quantity(12, UnitKind.BYTES, key="k") == 12.0
    with pytest.raises(ClusterSpecError, match="gpu.mem_bytes.*bytes_per_s"):
        parse_quantity("400 Gb/s", UnitKind.BYTES, key="gpu.mem_bytes")
    with pytest.raises(ClusterSpecError, match="unknown unit"):
        parse_quantity("3 furlongs", UnitKind.BYTES, key="k")
    with pytest.raises(ClusterSpecError, match="boolean"):
        parse_quantity(True, UnitKind.BYTES, key="k")


def test_describe_names_gpu_and_links() -> None:
    line = Cluster.preset("dgx-a100-80gb", nodes=2).describe()
    assert line.startswith("dgx-a100-80gb: 2 x 8 A100-SXM4-80GB") and "nvlink 300 GB/s" in line and "200 Gb/s" in line


@pytest.mark.parametrize("module", ["units", "cluster", "comm", "compute", "dtensor_host", "memory",
                                    "profiling.calibration", "layer_info"])
def test_docstring_examples(module: str) -> None:
    mod = importlib.import_module(f"autopar.cost_models.{module}")
    result = doctest.testmod(mod, extraglobs={"Cluster": Cluster})
    assert result.attempted > 0 and result.failed == 0


def test_importing_cost_models_does_not_import_torch() -> None:
    code = "import sys, autopar.cost_models as c; c.Cluster.preset('dgx-h100'); assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
