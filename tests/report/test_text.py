"""Golden strings for the text report of hand-built plans."""

from __future__ import annotations

import dataclasses

from autopar.plan import MemoryBreakdown
from autopar.report.text import compress_paths, format_plan, format_ranked, format_table
from tests.report.sample_plans import GB, GIB, data_parallel_plan, gpt175b_plan, interleaved_plan

GOLDEN_PLAN = """\
gpt:1.3b on dgx-a100-40g x2: dp2 tp2 pp4 mb2x8 zero1 rc=full interleaved-1f1b/v2 (16 of 16 GPUs)
  step 1.250 s, 120.0 model TFLOP/s/GPU (MFU 38.5%), 26,214 tokens/s, bubble 15.8%
  peak memory 14.0 GiB of 40.0 GiB

Stages
  stage  rank  layers  n  modules                               recompute  fwd ms  bwd ms
      0     0     0-3  4  tok_emb+pos_emb, blocks.0 … blocks.2  full        12.00   36.00
      1     1     4-6  3  blocks.3, blocks.4, blocks.5          full        12.00   36.00
      2     2     7-9  3  blocks.6, blocks.7, blocks.8          full        12.00   36.00
      3     3   10-12  3  blocks.9, blocks.10, blocks.11        full        12.00   36.00
      4     0   13-15  3  blocks.12, blocks.13, blocks.14       full        12.00   36.00
      5     1   16-18  3  blocks.15, blocks.16, blocks.17       full        12.00   36.00
      6     2   19-21  3  blocks.18, blocks.19, blocks.20       full        12.00   36.00
      7     3   22-25  4  blocks.21, blocks.22 … ln_f+lm_head   full        12.00   36.00

Sharding (tp=2)
  layer kind block (stages 0-7)
    module       style
    ln_1         replicate
    attn.q_proj  colwise
    attn.k_proj  colwise
    attn.v_proj  colwise
    attn.c_proj  rowwise
    ln_2         replicate
    mlp.c_fc     colwise
    mlp.c_proj   rowwise
    ops: 4 × S1 = R x S1, 2 × R = S1 x S0
    forward collectives per micro-batch: all_reduce ×2 (16.0 MiB)

Memory per GPU (GiB)
  rank  params  grads  optimizer  activations  buffers  total  capacity   free
     0    1.86   1.86       5.59         3.73     0.93  13.97     40.00  26.03  ok
     1    1.86   1.86       5.59         2.79     0.93  13.04     40.00  26.96  ok
     2    1.86   1.86       5.59         1.86     0.93  12.11     40.00  27.89  ok
     3    1.86   1.86       5.59         0.93     0.93  11.18     40.00  28.82  ok

Communication per step (on the critical path)
  kind                  time  of step
  DP reduce-scatter  0.100 s     8.0%
  PP send/recv       0.032 s     2.6%

Why this plan
  (no runner-up was recorded)"""

GOLDEN_RANKED = """\
gpt:175b on dgx-a100 x8, global batch 64, seq 2048
  #  layout                                                GPUs      step  TFLOP/s/GPU    MFU   peak mem / GPU  bubble
  1  dp1 tp8 pp8 mb1x64 zero1 rc=selective sp 1f1b        64/64  13.100 s        160.4  51.4%  52.5 / 80.0 GiB    9.9%
  2  dp2 tp2 pp4 mb2x8 zero1 rc=full interleaved-1f1b/v2  16/16   1.250 s        120.0  38.5%  14.0 / 40.0 GiB   15.8%"""


def test_plan_report_golden() -> None:
    assert format_plan(interleaved_plan()) == GOLDEN_PLAN.rstrip("\n")


def test_ranked_table_golden() -> None:
    assert format_ranked([gpt175b_plan(), interleaved_plan()]) == GOLDEN_RANKED.rstrip("\n")


def test_report_says_why_and_where_numbers_come_from() -> None:
    text = format_plan(gpt175b_plan())
    why = text.split("Why this plan\n")[1]
    assert why.startswith("  beats the runner-up dp1 tp8 pp8 mb1x64 zero1 rc=full sp 1f1b by 24.1% step time:")
    assert text.rstrip().endswith("Numbers from: calibration=none, compute=roofline")
    assert "Sharding (tp=8, sequence parallel)" in text
    assert "none (tp=1)" in format_plan(data_parallel_plan())


def test_over_capacity_rank_is_flagged() -> None:
    plan = data_parallel_plan()
    over = MemoryBreakdown(params=GB, grads=GB, optimizer=GB, activations=80 * GIB, buffers=0, capacity=80 * GIB)
    plan = dataclasses.replace(plan, predicted=dataclasses.replace(plan.predicted, memory=(over,)))
    memory = format_plan(plan).split("Memory per GPU (GiB)\n")[1].split("\n\n")[0].splitlines()
    assert memory[1].split() == ["0", "0.93", "0.93", "0.93", "80.00", "0.00", "82.79", "80.00", "-2.79", "OVER"]


def test_helpers() -> None:
    assert compress_paths(["a", "b"]) == "a, b"
    assert compress_paths(["", "x.0", "x.1", "x.2", "y"]) == "(root), x.0 … y"
    assert format_table(["n"], [["10"], ["2"]], right=[True], indent="") == " n\n10\n 2"
