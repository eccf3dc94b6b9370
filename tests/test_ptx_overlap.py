"""The compile report's softmax-overlap count (kernels.compile_report.ex2_in_flight) on hand-written PTX: the
two loop shapes the forward compiles to, and a wait that covers the exponentials."""

from pill_kernels import compile_report as cr

PROLOGUE = """
wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;
wgmma.commit_group.sync.aligned;
wgmma.wait_group.sync.aligned 0;
"""
# in order: S = Q K^T, wait for it (and every older group), softmax, then P V left in flight to the back edge
IN_ORDER = """
$L__BB0_7:
wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;
wgmma.commit_group.sync.aligned;
wgmma.wait_group.sync.aligned 0;
ex2.approx.ftz.f32 %f3, %f4;
ex2.approx.ftz.f32 %f5, %f6;
wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, {%r1}, %rd3, p, 1, 1, 1;
wgmma.commit_group.sync.aligned;
@%p40 bra $L__BB0_7;
wgmma.wait_group.sync.aligned 0;
"""
# look-ahead: the softmax runs first, while the previous iteration's P V is still in flight
OVERLAPPED = """
$L__BB0_7:
ex2.approx.ftz.f32 %f3, %f4;
ex2.approx.ftz.f32 %f5, %f6;
wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;
wgmma.commit_group.sync.aligned;
wgmma.wait_group.sync.aligned 0;
wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, {%r1}, %rd3, p, 1, 1, 1;
wgmma.commit_group.sync.aligned;
@%p40 bra $L__BB0_7;
wgmma.wait_group.sync.aligned 0;
"""


def test_in_order_loop_has_no_exp2_in_flight():
    assert cr.ex2_in_flight(PROLOGUE + IN_ORDER) == 0


def test_look_ahead_loop_runs_its_softmax_under_a_wgmma():
    assert cr.ex2_in_flight(PROLOGUE + OVERLAPPED) == 2


def test_exp2_after_a_wait_zero_outside_loops_is_not_counted():
    straight = PROLOGUE + "ex2.approx.f32 %f3, %f4;\nwgmma.commit_group.sync.aligned;\nex2.approx.f32 %f5, %f6;\n"
    assert cr.ex2_in_flight(straight) == 1
