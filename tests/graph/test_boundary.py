"""A layer's pipeline boundary is what the emitted program sends, not everything the layer reads.

``autopar.emit.program`` recomputes a value made from the model's inputs and buffers alone (an attention mask,
rotary cos/sin) in every later stage and relays the inputs it is made from, so ``Layer.boundary_nbytes`` counts
those inputs instead of the value (``autopar.graph.layers.input_only_sources``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import autopar
from autopar.graph.ir import Op, OpClass, TensorMeta
from autopar.graph.layers import MAX_RECOMPUTED_NODES, RANDOM_ATEN_OPS, input_only_sources

BATCH, SEQ, HIDDEN, VOCAB = 2, 8, 16, 32
HIDDEN_BYTES = BATCH * SEQ * HIDDEN * 4
"""The fp32 hidden state (batch, seq, hidden)."""
IDS_BYTES = BATCH * SEQ * 8
"""The int64 token ids (batch, seq)."""


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
        return x + mask @ self.fc(x) + table  # (B, S, S) @ (B, S, H) + (S, H)


class _Net(nn.Module):
    """Blocks that read the hidden state, a (B, S, S) mask and an (S, H) rotary-like table."""

    def __init__(self, mask_from: str) -> None:
        super().__init__()
        self.mask_from = mask_from
        self.emb = nn.Embedding(VOCAB, HIDDEN)
        self.gate = nn.Parameter(torch.ones(SEQ, SEQ))
        self.drop = nn.Dropout(0.5)  # capture runs the model in training mode
        self.register_buffer("inv_freq", torch.ones(HIDDEN), persistent=False)
        self.blocks = nn.ModuleList([_Block() for _ in range(2)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.emb(ids)
        mask = (ids[:, :, None] >= ids[:, None, :]).float()  # from the token ids alone
        if self.mask_from == "param":
            mask = mask * self.gate
        elif self.mask_from == "dropout":
            mask = self.drop(mask)
        positions = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32)
        table = torch.cos(positions[:, None] * self.inv_freq)  # from a buffer and arange
        for block in self.blocks:
            x = block(x, mask, table)
        return x


def _block_boundaries(mask_from: str) -> list[int]:
    with torch.device("meta"):
        model = _Net(mask_from)
    graph = autopar.capture(model, (torch.zeros(BATCH, SEQ, dtype=torch.long),))
    blocks = [layer for layer in graph.layers if layer.module_path.startswith("blocks.")]
    assert [layer.module_path for layer in blocks] == ["blocks.0", "blocks.1"]
    assert all(len(layer.input_meta) == 3 for layer in blocks)  # what the block reads is unchanged
    return [layer.boundary_nbytes for layer in blocks]


def test_values_made_from_inputs_alone_are_not_sent():
    # the mask and the table are recomputed by the stage: the hidden state and the ids it is made from travel
    assert _block_boundaries("inputs") == [HIDDEN_BYTES + IDS_BYTES] * 2


@pytest.mark.parametrize("mask_from", ["param", "dropout"])
def test_values_made_with_a_parameter_or_random_op_are_sent(mask_from):
    # the mask is sent as it is (fp32, B·S·S); the table (buffer and arange only) still is not
    assert _block_boundaries(mask_from) == [HIDDEN_BYTES + BATCH * SEQ * SEQ * 4] * 2


def test_gpt_block_sends_the_hidden_state(tiny_gpt_graph):
    block = tiny_gpt_graph.layers[1]
    assert block.sent_meta == block.input_meta and block.boundary_nbytes == 2 * 16 * 64 * 4


def _chain(length: int) -> dict[str, Op]:
    """``length`` elementwise ops in a row, the first reading a graph input."""
    meta = TensorMeta(shape=(BATCH, SEQ), dtype="int64")
    return {f"op{i}": Op(name=f"op{i}", target="aten.add.Scalar", op_class=OpClass.ELEMENTWISE, inputs=(meta,),
                         input_ops=(f"op{i - 1}" if i else None,), input_params=(None,), outputs=(meta,), flops=0,
                         nbytes_moved=0, module_path="") for i in range(length)}


def test_recompute_cap_is_emits():
    fits, too_long = _chain(MAX_RECOMPUTED_NODES), _chain(MAX_RECOMPUTED_NODES + 1)
    assert input_only_sources(f"op{MAX_RECOMPUTED_NODES - 1}", fits, ()) == {
        f"<input:{(BATCH, SEQ)}>": TensorMeta(shape=(BATCH, SEQ), dtype="int64")}
    assert input_only_sources(f"op{MAX_RECOMPUTED_NODES}", too_long, ()) is None


def test_random_ops_are_torchs_nondeterministic_seeded():
    """Emit reads ``torch.Tag.nondeterministic_seeded`` on the exported program; the torch-free list mirrors it."""
    tagged = set()
    for full_name in torch._C._dispatch_get_all_op_names():  # "aten::native_dropout" or "aten::add.Tensor"
        namespace, _, name = full_name.partition("::")
        packet, _, overload = name.partition(".")
        if namespace == "aten" and torch.Tag.nondeterministic_seeded in getattr(
                getattr(torch.ops.aten, packet), overload or "default").tags:
            tagged.add(packet)
    assert tagged == set(RANDOM_ATEN_OPS)
