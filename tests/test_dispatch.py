"""The planner, calibration, strategy="auto" / method="auto" and `python -m seqpar plan`."""
import contextlib
import dataclasses
import io
import json
import os

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.__main__ import main as cli_main
from seqpar import registry
from seqpar.attention import analytic_bytes, check_strategy
from seqpar.planner import Timeline, Topology, default_topology, model, visible_elements
from seqpar.planner import topology as topo_module
from seqpar.layout import SCHEMES, GroupLayout, SeqLayout, visible_blocks
from seqpar.strategies import linear as linear_strategy
from seqpar.strategies import ulysses
from seqpar.testing import AttentionProblem, LinearProblem, assert_matches_dense, check_attention, world
from seqpar.testing.checks import check_linear_attention


def _flat(**changes) -> Topology:
    """A one-node topology with every link alike (tests change what they study)."""
    base = dict(ranks_per_node=64, intra_bandwidth=1e10, intra_latency=1e-5, inter_bandwidth=1e10,
                inter_latency=1e-5, compute_rate=1e12, backward_rate=1e12, kernel_overhead=0.0, source="test")
    base.update(changes)
    return Topology(**base)


# -- exact counts ------------------------------------------------------------------------------


def _count_blocks(layout, q_rank, k_rank, causal):
    total = 0
    for blk in visible_blocks(layout, q_rank, k_rank, causal):
        if blk.offset is None:
            total += blk.q_len * blk.k_len
        else:
            total += sum(min(max(i + blk.offset + 1, 0), blk.k_len) for i in range(blk.q_len))
    return total


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("world_size, seq_len", [(1, 5), (2, 7), (3, 3), (3, 29), (4, 37), (5, 64)])
def test_visible_elements_equal_visible_blocks(scheme, world_size, seq_len):
    for causal in (True, False):
        layout = SeqLayout.simulated(seq_len, world_size, 0, scheme)
        got = visible_elements(layout, causal)
        want = [[_count_blocks(layout, i, j, causal) for j in range(world_size)] for i in range(world_size)]
        assert got.tolist() == want
        # USP's outer ring over groups of two ranks sees the same pairs
        if world_size % 2 == 0 and world_size > 2:
            groups = [[2 * g, 2 * g + 1] for g in range(world_size // 2)]
            ring = GroupLayout(layout, groups, 0)
            want = [[_count_blocks(ring, i, j, causal) for j in range(ring.world_size)]
                    for i in range(ring.world_size)]
            assert visible_elements(ring, causal).tolist() == want


def test_causal_work_depends_on_the_scheme():
    """Contiguous causal: the last rank's queries see every key before them, rank 0's only
    its own; zigzag splits the triangle evenly; the planner's ring compute follows."""
    contiguous = visible_elements(SeqLayout.simulated(64, 4, 0, "contiguous"), True).sum(1)
    zigzag = visible_elements(SeqLayout.simulated(64, 4, 0, "zigzag"), True).sum(1)
    assert contiguous.tolist() == [136, 392, 648, 904]
    assert len(set(zigzag.tolist())) == 1 and zigzag.sum() == contiguous.sum() == 64 * 65 // 2
    kwargs = dict(world_size=4, heads=8, head_dim=64, dtype="float32", topology=_flat(compute_rate=1e9))
    ring_c = seqpar.plan(4096, scheme="contiguous", **kwargs).candidate("ring")
    ring_z = seqpar.plan(4096, scheme="zigzag", **kwargs).candidate("ring")
    assert ring_c.compute_s > 1.5 * ring_z.compute_s


# -- the plan ---------------------------------------------------------------------------------


def test_infeasible_candidates_carry_the_strategies_own_reasons():
    result = seqpar.plan(4096, world_size=4, heads=6, kv_heads=6, head_dim=64, topology=_flat())
    uly = result.candidate("ulysses")
    assert not uly.feasible
    assert uly.reason == ulysses.head_constraint(6, 6, 4, "ulysses")
    assert "query heads (6) must be divisible by the Ulysses size (4)" in uly.reason
    assert result.strategy != "ulysses"
    assert "ulysses: query heads (6)" in str(result)
    # each feasible candidate is one the strategy itself accepts
    layout = SeqLayout.simulated(4096, 4, 0, "contiguous")
    q = torch.empty(1, 1024, 6, 64, device="meta")
    for c in result.feasible:
        check_strategy(c.strategy, q, q, q, layout, c.kwargs)
    assert {c.strategy for c in result.feasible} >= {"ring", "usp", "allgather", "token_ring"}


def test_kv_heads_that_no_split_allows():
    result = seqpar.plan(4096, world_size=4, heads=12, kv_heads=3, head_dim=64, topology=_flat())
    reasons = {c.label: c.reason for c in result.infeasible}
    assert "KV heads (3) must divide or be divisible by the Ulysses size (4)" in reasons["ulysses"]
    assert "usp(ulysses_size=2)" in reasons


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("world_size, seq_len, heads, kv_heads, causal, training, dtype", [
    (4, 1000, 8, 2, True, True, "bfloat16"),
    (3, 101, 6, 3, False, True, "float32"),
    (4, 37, 4, 4, True, False, "float64"),
    (6, 600, 12, 6, True, True, "float16"),
])
def test_predicted_bytes_are_the_analytic_volumes(scheme, world_size, seq_len, heads, kv_heads, causal, training,
                                                  dtype):
    result = seqpar.plan(seq_len, world_size=world_size, heads=heads, kv_heads=kv_heads, head_dim=16, dtype=dtype,
                         causal=causal, training=training, batch=2, scheme=scheme, topology=_flat())
    size = torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert result.feasible
    for c in result.feasible:
        per_rank = [analytic_bytes(c.strategy, SeqLayout.simulated(seq_len, world_size, r, scheme), 2, heads,
                                   kv_heads, 16, size, causal=causal, **c.kwargs) for r in range(world_size)]
        assert c.bytes_forward == max(b["forward"] for b in per_rank), c.label
        assert c.bytes_backward == (max(b["backward"] for b in per_rank) if training else 0), c.label
        assert c.time_s == pytest.approx(c.compute_s + c.exposed_s)
        assert c.exposed_s <= c.comm_s + 1e-12 and c.peak_memory > 0


def test_slow_inter_node_links_and_many_heads_choose_usp_within_a_node():
    topo = default_topology("cuda", "bfloat16", 16, ranks_per_node=8).replace(inter_bandwidth=1e9)
    result = seqpar.plan(131072, world_size=16, heads=32, kv_heads=8, head_dim=128, scheme="zigzag", topology=topo)
    assert (result.strategy, result.options) == ("usp", {"ulysses_size": 8})
    # its all-to-alls stay in the node and its ring crosses the slow links with 1/8 of the KV heads;
    # Ulysses' all-to-all and ring's K/V both cross them
    usp = result.choice.time_s
    assert result.candidate("ulysses").time_s > 2 * usp and result.candidate("ring").time_s > 2 * usp


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("world_size, heads", [(8, 8), (4, 6), (6, 4)])
def test_tiny_problem_huge_latency_chooses_the_fewest_messages(training, world_size, heads):
    topo = _flat(intra_latency=1.0, inter_latency=1.0)
    result = seqpar.plan(64 * world_size, world_size=world_size, heads=heads, head_dim=8, dtype="float32",
                         training=training, topology=topo)
    fewest = min(c.messages for c in result.feasible)
    assert result.choice.messages == fewest
    assert result.choice.time_s == pytest.approx(fewest, rel=1e-3)


def test_memory_limit_makes_candidates_infeasible():
    unlimited = seqpar.plan(65536, world_size=8, heads=32, kv_heads=8, head_dim=128, topology=_flat())
    smallest = min(c.peak_memory for c in unlimited.feasible)
    limit = (smallest + sorted(c.peak_memory for c in unlimited.feasible)[1]) / 2
    limited = seqpar.plan(65536, world_size=8, heads=32, kv_heads=8, head_dim=128,
                          topology=_flat(memory_limit=limit))
    assert len(limited.feasible) >= 1 and all(c.peak_memory <= limit for c in limited.feasible)
    assert any(c.reason.startswith("memory: needs about") for c in limited.infeasible)
    with pytest.raises(ValueError, match="topology: no strategy can serve this problem"):
        seqpar.plan(65536, world_size=8, heads=32, kv_heads=8, head_dim=128,
                    topology=_flat(memory_limit=smallest / 2))


def test_gathering_everything_costs_memory():
    result = seqpar.plan(262144, world_size=8, heads=32, kv_heads=8, head_dim=128, topology=_flat())
    whole = result.candidate("allgather").peak_memory
    chunked = result.candidate("allgather", kv_head_chunk=1).peak_memory
    assert chunked < whole and result.candidate("ring").peak_memory < whole


def test_plan_is_deterministic():
    kwargs = dict(world_size=8, heads=16, kv_heads=4, head_dim=64, scheme="stripe", topology=_flat())
    first = seqpar.plan(8192, **kwargs)
    model._plan.cache_clear()
    again = seqpar.plan(8192, **kwargs)
    assert first is not again and first == again and str(first) == str(again)


def test_near_ties_go_to_the_preferred_strategy(monkeypatch, request):
    # contiguous causal: Ulysses is predicted fastest, ring about 1.7x slower
    kwargs = dict(world_size=4, heads=8, kv_heads=8, head_dim=64, scheme="contiguous", topology=_flat())
    request.addfinalizer(model._plan.cache_clear)  # runs after monkeypatch restores TIE: no stale plans
    monkeypatch.setattr(model, "TIE", 0.0)
    model._plan.cache_clear()
    exact = seqpar.plan(4096, **kwargs)
    fastest = min(exact.feasible, key=lambda c: c.time_s)
    assert exact.choice is fastest and fastest.strategy != "ring" and "a tie" not in str(exact)
    assert [c.time_s for c in exact.feasible] == sorted(c.time_s for c in exact.feasible)
    # every candidate within the margin: the first of TIE_PREFERENCE wins, the rest keep their order
    monkeypatch.setattr(model, "TIE", 10.0)
    model._plan.cache_clear()
    tied = seqpar.plan(4096, **kwargs)
    assert tied.strategy == "ring" and tied.feasible[0] is tied.choice and tied.choice.label != fastest.label
    rest = tied.feasible[1:]
    assert [c.time_s for c in rest] == sorted(c.time_s for c in rest)
    assert {c.label for c in tied.feasible} == {c.label for c in exact.feasible}
    assert f"within 1000% of the fastest, {fastest.label}: a tie, which goes to ring by TIE_PREFERENCE" in str(tied)
    # a margin that ring's prediction misses: the fastest stays the choice
    ring_over = exact.candidate("ring").time_s / fastest.time_s - 1.0
    monkeypatch.setattr(model, "TIE", ring_over * 0.9)
    model._plan.cache_clear()
    assert seqpar.plan(4096, **kwargs).choice.label == fastest.label


@pytest.mark.parametrize("change, err, match", [
    (dict(kv_heads=3), ValueError, "kv_heads: expected a divisor of heads=8, got 3"),
    (dict(seq_len=3), ValueError, "seq_len: expected at least world_size=4"),
    (dict(world_size=0), ValueError, "world_size: expected a positive int, got 0"),
    (dict(scheme="spiral"), ValueError, "scheme: expected one of"),
    (dict(dtype="int8"), ValueError, "dtype: expected one of"),
    (dict(causal="yes"), TypeError, "causal: expected a bool"),
    (dict(topology="fast"), TypeError, "topology: expected a seqpar.Topology"),
])
def test_plan_bad_input(change, err, match):
    kwargs = dict(seq_len=64, world_size=4, heads=8)
    kwargs.update(change)
    with pytest.raises(err, match=match):
        seqpar.plan(kwargs.pop("seq_len"), **kwargs)


def test_topology_bad_input_and_json_round_trip():
    with pytest.raises(ValueError, match="intra_bandwidth: expected a positive finite number, got 0"):
        _flat(intra_bandwidth=0)
    with pytest.raises(ValueError, match="measured: expected"):
        _flat(measured=(("intra", "teleport", 1.0, 1.0),))
    topo = _flat(measured=(("intra", "alltoall", 2e-5, 5e9),))
    assert Topology.from_dict(json.loads(json.dumps(topo.to_dict()))) == topo
    assert topo.link("intra", "alltoall") == (2e-5, 5e9) and topo.link("intra", "p2p") == (1e-5, 1e10)
    with pytest.raises(ValueError, match=r"topology: unknown fields \['speed'\]"):
        Topology.from_dict({"speed": 1})


# -- the model asks the registry ----------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _DummyOptions:
    factor: int = 1

    def resolve(self, q, k, v, layout):
        return self


def _dummy(seconds: float, memory: int = 1 << 20, **changes) -> registry.Strategy:
    """A strategy the built-in files know nothing about: its schedule is `seconds` of work
    times its option `factor`, planned at factor 1 and 3."""

    def cost(prob, topo, options):
        line = Timeline(topo.overlap)
        line.work(seconds * options["factor"])
        line.wait(1e-9 * options["factor"], messages=options["factor"])
        return line, {"forward": 7 * options["factor"], "backward": 9}

    fields = dict(name="dummy", apply=None, analytic_bytes=None, Options=_DummyOptions, cost=cost,
                  peak_memory=lambda prob, options: memory * options["factor"],
                  candidates=lambda prob: [{"factor": 1}, {"factor": 3}])
    fields.update(changes)
    return registry.Strategy(**fields)


def _agreement(topo, world):
    return topo.transfer(topo.level(range(world)), "allreduce", world, 16.0)


def test_a_registered_strategy_is_planned_with_its_own_cost_memory_and_candidates(monkeypatch):
    kwargs = dict(world_size=4, heads=8, head_dim=64, topology=_flat())
    before = seqpar.plan(4096, **kwargs)
    assert "dummy" not in str(before)
    monkeypatch.setitem(registry._REGISTRY, "dummy", _dummy(1e-9))
    result = seqpar.plan(4096, **kwargs)  # a new registration is a new plan, not the cached one
    assert (result.strategy, result.options) == ("dummy", {"factor": 1})
    agree = _agreement(kwargs["topology"], 4)
    for factor in (1, 3):
        c = result.candidate("dummy", factor=factor)
        assert c.feasible and c.time_s == pytest.approx(factor * (1e-9 + 1e-9) + agree)
        assert c.compute_s == pytest.approx(factor * 1e-9) and c.exposed_s == pytest.approx(factor * 1e-9 + agree)
        assert (c.bytes_forward, c.bytes_backward, c.peak_memory) == (7 * factor, 9, factor << 20)
        assert c.messages == factor + 3 * 2  # its own, plus the agreement's all-reduce steps
    assert "| * | dummy(factor=1) |" in str(result) and "dummy(factor=3)" in str(result)
    # the built-in candidates and their order are unchanged by the newcomer
    assert [c for c in result.candidates if c.strategy != "dummy"] == list(before.candidates)
    # slow, it is planned and not chosen; over the memory limit, infeasible with the memory reason
    monkeypatch.setitem(registry._REGISTRY, "dummy", _dummy(10.0, memory=1 << 40))
    slow = seqpar.plan(4096, **kwargs)
    assert slow.strategy == before.strategy and slow.candidate("dummy", factor=1).time_s > 10.0
    limited = seqpar.plan(4096, **dict(kwargs, topology=_flat(memory_limit=1 << 39)))
    assert limited.candidate("dummy", factor=1).reason.startswith("memory: needs about")


def test_a_strategy_without_a_cost_is_listed_not_planned(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "dummy", _dummy(1e-9, cost=None, peak_memory=None, candidates=None))
    result = seqpar.plan(4096, world_size=4, heads=8, head_dim=64, topology=_flat())
    c = result.candidate("dummy")
    assert not c.feasible and "registers no cost model (Strategy.cost)" in c.reason
    with pytest.raises(ValueError, match="a cost needs a peak_memory too"):
        registry.register(_dummy(1e-9, peak_memory=None))
    assert registry.get("dummy").cost is None  # the refused record was not registered


def test_the_model_asks_every_registered_strategy(monkeypatch):
    """Each built-in candidate's prediction is its own record's cost (plus the agreement)."""
    asked = []

    def spy(record):
        def cost(prob, topo, options):
            line, nbytes = record.cost(prob, topo, options)
            asked.append((record.name, tuple(sorted(options.items())), line.total))
            return line, nbytes
        return dataclasses.replace(record, cost=cost)

    for name in registry.names():
        monkeypatch.setitem(registry._REGISTRY, name, spy(registry.get(name)))
    topo = _flat()
    result = seqpar.plan(4096, world_size=4, heads=8, kv_heads=2, head_dim=64, topology=topo)
    assert {name for name, _, _ in asked} == set(registry.names())
    for name, options, total in asked:
        c = result.candidate(name, **dict(options))
        assert c.time_s == pytest.approx(total + _agreement(topo, 4))
    assert len(asked) == len(result.candidates)  # every candidate feasible here, each costed once


def test_plan_linear_choices():
    small = model.plan_linear(65536, world_size=4, heads=4, key_dim=64, topology=_flat())
    assert small.method == "allgather"
    # a big state over many ranks of slow links: the pipelined scan, in several pieces
    slow = _flat(intra_bandwidth=1e9, compute_rate=1e15, backward_rate=1e15)
    big = model.plan_linear(65536, world_size=64, heads=32, key_dim=256, topology=slow)
    assert big.method == "allscan" and big.scan_pieces > 1
    assert model.best_scan_pieces(slow, 2, 1 << 20) == 1
    assert [c.method for c in big.candidates][-1] == "ring"  # never faster than the scan
    s = linear_strategy.state_bytes(1, 32, 256, 256)
    assert {c.method: c.bytes_forward for c in big.candidates} == {"allgather": 63 * (s + 4 * 32), "allscan": s,
                                                                    "ring": s}
    assert "allscan" in str(big)


# -- the command line -------------------------------------------------------------------------


def test_cli_plan_prints_the_table():
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli_main(["plan", "--seq-len", "65536", "--world-size", "16", "--heads", "6", "--kv-heads", "2",
                         "--ranks-per-node", "8", "--device", "cuda", "--inter-bandwidth", "2", "--no-training"])
    text = out.getvalue()
    assert code == 0
    assert "| * |" in text and "predicted ms" in text and "chosen:" in text
    assert "inference (fwd)" in text and "inter 2 GB/s" in text
    assert "ulysses: query heads (6) must be divisible by the Ulysses size (16)" in text
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as exc:
        cli_main(["plan", "--seq-len", "8", "--world-size", "16"])
    assert exc.value.code == 2 and "seq_len: expected at least world_size=16" in err.getvalue()


# -- on real worlds: auto, mismatches, calibration --------------------------------------------


def _auto_with(problem, topo, linear=False):
    """check_attention with strategy="auto" while this rank plans on `topo` (None: as
    configured); returns the report and the strategies whose traffic was seen."""
    original = topo_module.auto_topology
    if topo is not None:
        topo_module.auto_topology = lambda group, device, dtype: topo
    try:
        with seqpar.comm.track() as stats:
            if linear:
                report = check_linear_attention(problem, method="auto")
            else:
                report = check_attention(problem)  # seqpar.attention, strategy="auto"
        return report, sorted({op.split(".")[0] for op in stats.ops} - {"check", "layout"})
    finally:
        topo_module.auto_topology = original


_SLOW = dict(intra_latency=0.0, inter_latency=0.0, intra_bandwidth=1e3, compute_rate=1e3, backward_rate=1e3)
AUTO_CASES = [
    # (world, seq_len, heads, kv_heads, topology changes); the plan decides which strategy runs
    (4, 40, 4, 4, dict(_SLOW, ranks_per_node=4)),  # ring: its exchanges hide behind the blocks
    (4, 40, 4, 4, dict(_SLOW, inter_bandwidth=10.0, ranks_per_node=1)),  # ulysses: fewest bytes
    # MQA on slow links: the same bytes as ring, and the all-gather's return of dK/dV flies
    # behind the next source's blocks (only its last round is exposed): all-gather
    (4, 40, 4, 1, dict(_SLOW, inter_bandwidth=10.0, ranks_per_node=1)),
    (4, 40, 4, 4, dict(intra_latency=1e-6, inter_latency=1e-5, intra_bandwidth=1e15, inter_bandwidth=1e13,
                       compute_rate=1e9, backward_rate=1e9, ranks_per_node=2)),  # usp: fewest latency steps
    (2, 21, 2, 2, None),  # the CPU defaults
]


@pytest.mark.parametrize("world_size, seq_len, heads, kv_heads, topo", AUTO_CASES)
def test_auto_is_exact_and_runs_the_planned_strategy(world_size, seq_len, heads, kv_heads, topo):
    topology = _flat(**topo) if topo is not None else default_topology("cpu", "float64", world_size)
    problem = AttentionProblem(world_size=world_size, seq_len=seq_len, heads=heads, kv_heads=kv_heads, causal=True,
                               scheme="zigzag")
    expected = seqpar.plan(seq_len, world_size=world_size, heads=heads, kv_heads=kv_heads, head_dim=8,
                           dtype="float64", causal=True, training=True, scheme="zigzag", topology=topology)
    report, seen = world(world_size).run(_auto_with, problem, topology)[0]
    assert_matches_dense(problem, report)
    assert seen == [expected.strategy]


def test_auto_choices_cover_the_strategies():
    """The cases above reach ring, Ulysses, all-gather and USP."""
    chosen = []
    for world_size, seq_len, heads, kv_heads, topo in AUTO_CASES[:4]:
        chosen.append(seqpar.plan(seq_len, world_size=world_size, heads=heads, kv_heads=kv_heads, head_dim=8,
                                  dtype="float64", scheme="zigzag", topology=_flat(**topo)).strategy)
    assert chosen == ["ring", "ulysses", "allgather", "usp"]


def _disagree(problem, linear):
    """Rank 1 plans on a topology that makes a different choice: every rank must raise."""
    slow = _flat(intra_bandwidth=1e3, compute_rate=1e3, backward_rate=1e3, ranks_per_node=4)
    fast_links = _flat(intra_bandwidth=1e15, intra_latency=1.0, compute_rate=1e15, backward_rate=1e15)
    mine = fast_links if dist.get_rank() == 1 else slow
    return _auto_with(problem, mine, linear)


def test_auto_mismatch_between_ranks_raises_on_every_rank():
    problem = AttentionProblem(world_size=4, seq_len=40, heads=4, kv_heads=4, causal=True)
    outcomes = world(4).run(_disagree, problem, False, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, ValueError), outcome
        assert "strategy='auto' chose" in str(outcome) and "must be the same on every rank" in str(outcome)


def test_linear_auto_mismatch_between_ranks_raises_on_every_rank():
    problem = LinearProblem(world_size=4, seq_len=64, heads=2, key_dim=8, value_dim=8)
    outcomes = world(4).run(_disagree, problem, True, return_exceptions=True)
    for outcome in outcomes:
        assert isinstance(outcome, ValueError), outcome
        assert "method='auto' chose" in str(outcome)


def test_linear_auto_is_exact_and_follows_the_plan():
    from seqpar.testing.checks import tolerance_violations

    problem = LinearProblem(world_size=4, seq_len=64, heads=2, key_dim=8, value_dim=8)
    topo = _flat(intra_bandwidth=1e3, intra_latency=0.0)  # the all-gather's (P-1) states cost most
    report, seen = world(4).run(_auto_with, problem, topo, True)[0]
    assert not tolerance_violations(problem, report)
    expected = model.plan_linear(64, world_size=4, heads=2, key_dim=8, dtype="float64", topology=topo)
    assert expected.method != "allgather"
    assert seen == ["linear"]


def _calibrate_into(directory):
    previous = os.environ.get("SEQPAR_CACHE_DIR")
    os.environ["SEQPAR_CACHE_DIR"] = directory
    try:
        topo = seqpar.calibrate(message_sizes=(1 << 10, 1 << 16), repeats=2)
        path = topo_module.cache_path("gloo", dist.get_world_size(), torch.device("cpu"), torch.float32)
        topo_module._loaded.clear()  # as a fresh process would: read the file
        loaded = topo_module.auto_topology(None, torch.device("cpu"), torch.float32)
        return topo, loaded, str(path), sorted(os.listdir(directory))
    finally:
        if previous is None:
            del os.environ["SEQPAR_CACHE_DIR"]
        else:
            os.environ["SEQPAR_CACHE_DIR"] = previous
        topo_module._loaded.clear()


def test_calibrate_agrees_across_ranks_and_caches(tmp_path):
    results = world(2).run(_calibrate_into, str(tmp_path))
    (topo0, loaded0, path0, files0), (topo1, loaded1, path1, _) = results
    assert topo0 == topo1 == loaded0 == loaded1
    assert topo0.source.startswith("calibrated") and topo0.ranks_per_node == 2
    assert {kind for level, kind, _, _ in topo0.measured} == set(topo_module.KINDS)
    assert all(level == "intra" and lat > 0 and bw > 0 for level, _, lat, bw in topo0.measured)
    assert topo0.compute_rate > 0 and topo0.backward_rate > 0
    assert path0 == path1 and files0 == [os.path.basename(path0)]
    stored = json.loads((tmp_path / files0[0]).read_text())
    assert Topology.from_dict(stored["topology"]) == topo0 and len(stored["hosts"]) == 2
    assert topo_module.load_calibration(tmp_path / "missing.json") is None


def test_calibrate_needs_a_process_group():
    if dist.is_initialized():
        pytest.skip("this process has a group")
    with pytest.raises(ValueError, match="group: calibrate needs an initialized torch.distributed process group"):
        seqpar.calibrate()


def test_fit_survives_sizes_that_do_not_show_in_the_time():
    from seqpar.planner.calibration import _fit

    # a latency-bound collective whose largest message happened to time fastest
    latency, slope = _fit([(1e3, 8e-4), (1e5, 9e-4), (1e7, 7e-4)])
    assert 5e-4 < latency < 9e-4
    assert 1 / slope > 1e9  # bytes/s: the 10 MB message took under a millisecond
    # a clean alpha-beta line is recovered
    latency, slope = _fit([(x, 1e-4 + x / 2e9) for x in (1e3, 1e5, 1e7)])
    assert abs(latency - 1e-4) < 1e-6 and abs(1 / slope - 2e9) < 2e7


def test_plan_counts_a_window_and_documents():
    """Masked work and ring's masked bytes reach the plan: a window of about N/8 on a
    contiguous layout cuts ring's bytes to the previous rank's last 511 rows, and every
    block's work to the visible pairs."""
    full = seqpar.plan(4096, world_size=4, heads=8, head_dim=64, scheme="contiguous")
    windowed = seqpar.plan(4096, world_size=4, heads=8, head_dim=64, scheme="contiguous", window_size=(511, 0))
    ring_full = next(c for c in full.candidates if c.strategy == "ring")
    ring_win = next(c for c in windowed.candidates if c.strategy == "ring")
    assert ring_win.bytes_forward == 511 * 8 * 64 * 2 * 2 < ring_full.bytes_forward
    assert ring_win.compute_s < ring_full.compute_s / 3
    assert windowed.problem["window_size"] == [511, 0]
    docs = seqpar.plan(64, world_size=4, heads=2, head_dim=8, scheme="balanced", cu_seqlens=[0, 16, 32, 48, 64])
    assert next(c for c in docs.candidates if c.strategy == "ring").bytes_forward == 0
    assert "window_size=(511, 0)" in str(windowed) and "4 packed documents" in str(docs)


def test_visible_elements_with_a_window_equal_brute_force():
    from seqpar.layout import Mask, SeqLayout
    from seqpar.planner.schedule import visible_elements

    n = 37
    brute = sum(1 for i in range(n) for j in range(n) if j <= i and i - 5 <= j <= i + 2)
    for scheme in ("contiguous", "zigzag", "stripe"):
        layout = SeqLayout.simulated(n, 3, 0, scheme)
        assert int(visible_elements(layout, Mask(True, (5, 2))).sum()) == brute
    docs = (0, 10, 11, 37)
    layout = SeqLayout.simulated(n, 3, 0, "balanced", docs)
    in_docs = sum(1 for i in range(n) for j in range(n) if j <= i and
                  max(a for a in docs if a <= i) == max(a for a in docs if a <= j))
    assert int(visible_elements(layout, True).sum()) == in_docs


def test_cli_plan_takes_a_window_and_documents(tmp_path, capsys):
    from seqpar.planner.cli import main

    path = tmp_path / "docs.txt"
    path.write_text("[0, 3000, 3100, 8192]")
    assert main(["--seq-len", "8192", "--world-size", "4", "--heads", "8", "--scheme", "balanced",
                 "--cu-seqlens", str(path), "--window", "100", "0"]) == 0
    out = capsys.readouterr().out
    assert "window_size=(100, 0), 3 packed documents" in out


def test_plan_linear_counts_a_per_channel_gate():
    """A gate per key channel makes the all-gather carry a [Dk] total decay per (batch, head)."""
    plain = seqpar.plan_linear(4096, world_size=4, heads=2, key_dim=16, value_dim=8, dtype="float32", decay=True)
    gla = seqpar.plan_linear(4096, world_size=4, heads=2, key_dim=16, value_dim=8, dtype="float32", decay="channel")
    ag = {c.method: c for c in plain.candidates}["allgather"]
    ag_gla = {c.method: c for c in gla.candidates}["allgather"]
    assert ag_gla.bytes_forward - ag.bytes_forward == 3 * 2 * 15 * 4
    with pytest.raises(ValueError, match="decay: expected False, True or 'channel'"):
        seqpar.plan_linear(4096, world_size=4, heads=2, decay="head")
