"""seqpar.nn: the SDPA-signature function, the module, the patch, batch sharding, loss and gradients."""
import re
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F

import seqpar
from seqpar.layout import SeqLayout
from seqpar.nn import (
    SequenceParallelAttention, all_reduce_gradients, cross_entropy_share, global_loss, sdpa_patched, shard_batch,
)
from seqpar.nn.functional import scaled_dot_product_attention
from seqpar.testing import FLOAT64_RTOL, AttentionProblem, assert_matches_dense, check_attention, world


# -- every entry point computes dense attention (through seqpar.testing's check) -----------------------------
def _via_sdpa(q, k, v, *, layout, causal, softmax_scale, **masks):
    out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                                       scale=softmax_scale, enable_gqa=True, layout=layout, **masks)
    return out.transpose(1, 2)


def _via_patch(q, k, v, *, layout, causal, softmax_scale, **masks):
    with sdpa_patched(layout, strategy="allgather", **masks):
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=causal, scale=softmax_scale, enable_gqa=True)
    return out.transpose(1, 2)


def _via_module_bshd(q, k, v, *, layout, causal, softmax_scale, sinks=None, **masks):
    return SequenceParallelAttention(layout, causal=causal, softmax_scale=softmax_scale, strategy="token_ring",
                                     **masks)(q, k, v, sinks=sinks)


def _via_module_bhsd(q, k, v, *, layout, causal, softmax_scale, sinks=None, **masks):
    attn = SequenceParallelAttention(causal=causal, softmax_scale=softmax_scale, qkv_format="bhsd", **masks)
    return attn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), layout=layout, sinks=sinks).transpose(1, 2)


ENTRY_POINTS = {"sdpa": _via_sdpa, "patched": _via_patch, "module_bshd": _via_module_bshd,
                "module_bhsd": _via_module_bhsd}
PROBLEMS = {
    "p2_zigzag_gqa_causal": AttentionProblem(2, 19, heads=4, kv_heads=2, causal=True, scheme="zigzag"),
    "p3_stripe_mqa": AttentionProblem(3, 17, batch=2, heads=2, kv_heads=1, head_dim=12, scheme="stripe",
                                      logit_scale=4.0),
    # documents, a sliding window, softcap and sinks through every entry point
    "p3_balanced_docs_window_softcap_sinks": AttentionProblem(
        3, 23, heads=4, kv_heads=2, causal=True, scheme="balanced", documents=(0, 9, 12, 23), window=(4, 0),
        softcap=2.0, sinks=True, logit_scale=3.0),
}


@pytest.mark.parametrize("problem", sorted(PROBLEMS))
@pytest.mark.parametrize("entry", sorted(ENTRY_POINTS))
def test_entry_points_match_dense(entry, problem):
    p = PROBLEMS[problem]
    report = world(p.world_size).run(check_attention, p, ENTRY_POINTS[entry])[0]
    assert_matches_dense(p, report)


def test_single_process_sdpa_equals_torch_sdpa():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 11, 8, generator=gen, dtype=torch.float64)
    k, v = (torch.randn(2, 3, 11, 8, generator=gen, dtype=torch.float64) for _ in range(2))
    for causal in (False, True):
        ours = scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
        want = F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=0.3, enable_gqa=True)
        assert ours.shape == want.shape
        assert (ours - want).abs().max() <= FLOAT64_RTOL * want.abs().max()
    assert seqpar.scaled_dot_product_attention is scaled_dot_product_attention


# -- argument errors ---------------------------------------------------------------------------------------
def _bhsd(b=1, h=4, h_kv=2, n=6, d=8):
    return torch.randn(b, h, n, d), torch.randn(b, h_kv, n, d), torch.randn(b, h_kv, n, d)


Q, K, V = _bhsd()
SDPA_ERRORS = [
    ("mask", dict(attn_mask=torch.ones(6, 6, dtype=torch.bool)), ValueError,
     r"attn_mask: expected None .*use is_causal=True.*got a tensor of shape \(6, 6\)"),
    ("dropout", dict(dropout_p=0.1), ValueError, "dropout_p: expected 0.0 .*got 0.1"),
    ("dropout_type", dict(dropout_p="0"), TypeError, "dropout_p: expected a float, got str"),
    ("gqa_disabled", dict(enable_gqa=False), ValueError,
     "key: expected 4 heads .that of query. with enable_gqa=False, got 2; pass enable_gqa=True"),
    ("gqa_type", dict(enable_gqa=1), TypeError, "enable_gqa: expected a bool, got int"),
    ("heads_not_divisible", dict(key=torch.randn(1, 3, 6, 8), value=torch.randn(1, 3, 6, 8)), ValueError,
     "key: expected a number of heads that divides query's 4 heads, got 3"),
    ("cross_attention", dict(key=torch.randn(1, 2, 5, 8), value=torch.randn(1, 2, 5, 8)), ValueError,
     "key: expected seqlen .dim 2. 6, that of query: .*self-attention.*got 5"),
    ("value_heads", dict(value=torch.randn(1, 1, 6, 4)), ValueError,
     r"value: expected batch, heads and seqlen \(1, 2, 6\) \(those of key\) and any head_dim, "
     r"got shape \(1, 1, 6, 4\)"),
    ("window", dict(window_size=(2,)), TypeError, r"window_size: expected a pair of ints"),
    ("softcap", dict(softcap=-1.0), ValueError, r"softcap: expected a finite float >= 0"),
    ("sinks_shape", dict(sinks=torch.zeros(2)), ValueError, r"sinks: expected shape \[4\]"),
    ("query_3d", dict(query=torch.randn(4, 6, 8)), ValueError,
     r"query: expected 4 dims \[batch, heads, seqlen, head_dim\] .*got shape \(4, 6, 8\)"),
    ("key_type", dict(key=[1.0]), TypeError, "key: expected a torch.Tensor, got list"),
    ("key_dtype", dict(key=torch.randn(1, 2, 6, 8, dtype=torch.float64)), ValueError,
     "key: expected dtype torch.float32 .that of query., got torch.float64"),
    ("causal_type", dict(is_causal=None), TypeError, "is_causal: expected a bool, got NoneType"),
    ("scale_nan", dict(scale=float("nan")), ValueError, "scale: expected a finite float or None, got nan"),
    ("layout_len", dict(layout=SeqLayout(7)), ValueError,
     r"query: expected seqlen \(dim 2\) 7 \(layout.local_len on rank 0\), got 6"),
    ("strategy", dict(strategy="rng"), ValueError, "strategy: expected one of"),
]


@pytest.mark.parametrize("name, change, err, match", SDPA_ERRORS, ids=[c[0] for c in SDPA_ERRORS])
def test_sdpa_bad_input(name, change, err, match):
    args = dict(query=Q, key=K, value=V, enable_gqa=True)
    args.update(change)
    with pytest.raises(err, match=match):
        scaled_dot_product_attention(**args)


def test_module_has_no_parameters_and_checks_format():
    attn = SequenceParallelAttention(causal=True)
    assert list(attn.parameters()) == [] and list(attn.buffers()) == []
    assert "causal=True" in repr(attn) and "qkv_format='bshd'" in repr(attn)
    with pytest.raises(ValueError, match="qkv_format: expected one of .'bshd', 'bhsd'., got 'sbhd'"):
        SequenceParallelAttention(qkv_format="sbhd")


def test_patch_is_undone_on_exit_and_on_error_and_nests():
    original = F.scaled_dot_product_attention
    with sdpa_patched() as outer:
        assert F.scaled_dot_product_attention is outer
        with pytest.raises(ValueError, match="attn_mask: expected None"):
            with sdpa_patched() as inner:
                assert F.scaled_dot_product_attention is inner
                F.scaled_dot_product_attention(Q, K, V, attn_mask=torch.ones(6, 6, dtype=torch.bool), enable_gqa=True)
        assert F.scaled_dot_product_attention is outer
    assert F.scaled_dot_product_attention is original


# -- shard_batch (local: simulated layouts) --------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["contiguous", "zigzag", "stripe"])
@pytest.mark.parametrize("world_size, seq_len", [(2, 7), (3, 17), (4, 9)])
def test_shard_batch_shifts_globally_then_shards(world_size, seq_len, scheme):
    gen = torch.Generator().manual_seed(seq_len)
    ids = torch.randint(0, 50, (2, seq_len), generator=gen)
    labels = ids.clone()
    labels[0, 3] = -100
    mask = torch.ones_like(ids)
    extra = torch.randn(2, seq_len, 3, generator=gen)
    meta = torch.arange(5)
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    rebuilt = torch.full_like(labels, 12345)
    for rank in range(world_size):
        layout = SeqLayout.simulated(seq_len, world_size, rank, scheme)
        batch = {"input_ids": ids, "labels": labels, "attention_mask": mask, "extra": extra, "meta": meta, "note": "x"}
        out = shard_batch(batch, layout)
        assert "labels" not in out  # a model given them would shift again, locally
        positions = layout.positions()
        assert torch.equal(out["input_ids"], ids[:, positions])
        assert torch.equal(out["attention_mask"], mask[:, positions])
        assert torch.equal(out["extra"], extra[:, positions])
        assert out["meta"] is meta and out["note"] == "x"
        assert torch.equal(out["position_ids"], positions.expand(2, -1))
        # token at global position i is labelled with token i + 1, wherever i + 1 lives
        assert torch.equal(out["shift_labels"], shifted[:, positions])
        rebuilt[:, positions] = out["shift_labels"]
    assert torch.equal(rebuilt, shifted)
    assert (rebuilt[:, -1] == -100).all() and torch.equal(rebuilt[:, :-1], labels[:, 1:])


def test_shard_batch_contiguous_boundary_and_options():
    labels = torch.arange(10, 18).unsqueeze(0)  # [1, 8]
    first = shard_batch({"labels": labels}, SeqLayout.simulated(8, 2, 0))
    # the last token of rank 0 (position 3) predicts the first token of rank 1 (position 4)
    assert first["shift_labels"].tolist() == [[11, 12, 13, 14]]
    assert first["position_ids"].tolist() == [[0, 1, 2, 3]]
    second = shard_batch({"labels": labels, "position_ids": torch.arange(100, 108)}, SeqLayout.simulated(8, 2, 1),
                         ignore_index=-1)
    assert second["shift_labels"].tolist() == [[15, 16, 17, -1]]
    assert second["position_ids"].tolist() == [104, 105, 106, 107]
    unshifted = shard_batch({"labels": labels}, SeqLayout.simulated(8, 2, 1), shift_labels=False)
    assert unshifted["labels"].tolist() == [[14, 15, 16, 17]] and "shift_labels" not in unshifted


@pytest.mark.parametrize("batch, err, match", [
    ([1, 2], TypeError, "batch: expected a mapping of names to tensors, got list"),
    ({"input_ids": torch.zeros(2, 7, dtype=torch.long)}, ValueError,
     r"batch\['input_ids'\]: expected shape \[B, 8, ...\] .dim 1 = layout.seq_len., got \(2, 7\)"),
    ({"labels": [1, 2]}, TypeError, r"batch\['labels'\]: expected a torch.Tensor, got list"),
    ({"position_ids": torch.arange(7)}, ValueError, r"batch\['position_ids'\]: expected shape \[8\] or \[B, 8\]"),
])
def test_shard_batch_bad_input(batch, err, match):
    with pytest.raises(err, match=match):
        shard_batch(batch, SeqLayout.simulated(8, 2, 0))


def test_package_never_imports_transformers():
    code = (
        "import sys; sys.modules['transformers'] = None\n"  # as if not installed
        "import seqpar, seqpar.nn, seqpar.integrations.transformers as t\n"
        "try:\n    t.register()\nexcept ImportError as e:\n    print('ImportError', e)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    assert out.returncode == 0, out.stderr
    assert "ImportError seqpar.integrations.transformers needs transformers" in out.stdout


# -- loss and gradients on a real world --------------------------------------------------------------------------
def _loss_against_dense(seq_len, scheme, all_ignored):
    layout = SeqLayout(seq_len, scheme=scheme)
    gen = torch.Generator().manual_seed(seq_len)
    logits = torch.randn(2, seq_len, 11, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 11, (2, seq_len), generator=gen)
    labels[torch.rand(labels.shape, generator=gen) < 0.3] = -100
    if all_ignored:
        labels[:] = -100
    dense_logits = logits.clone().requires_grad_()
    dense = F.cross_entropy(dense_logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    dense.backward()
    local = shard_batch({"logits": logits, "labels": labels}, layout)
    mine = local["logits"].clone().requires_grad_()
    share = cross_entropy_share(mine, local["shift_labels"], layout)
    share.backward()
    total = global_loss(share, layout)
    grad_err = (mine.grad - layout.shard(dense_logits.grad)).abs().max().item()
    return dense.item(), total.item(), share.item(), grad_err, total.dtype


@pytest.mark.parametrize("world_size, seq_len, scheme", [(2, 13, "zigzag"), (3, 10, "stripe")])
def test_loss_shares_add_up_to_the_dense_mean(world_size, seq_len, scheme):
    results = world(world_size).run(_loss_against_dense, seq_len, scheme, False)
    dense = results[0][0]
    assert abs(sum(r[2] for r in results) - dense) <= FLOAT64_RTOL * dense
    for _, total, _, grad_err, dtype in results:
        assert abs(total - dense) <= FLOAT64_RTOL * dense and dtype == torch.float64
        assert grad_err <= FLOAT64_RTOL
    ignored = world(world_size).run(_loss_against_dense, seq_len, scheme, True)
    assert all(r[0] != r[0] and r[1] != r[1] for r in ignored)  # NaN, as torch's mean over no token


def _reduce_grads(bucket_elements):
    rank = dist.get_rank()
    used = torch.nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))
    used.grad = torch.full((3, 2), float(rank + 1), dtype=torch.float64)
    sometimes = torch.nn.Parameter(torch.zeros(4))
    if rank == 1:
        sometimes.grad = torch.arange(4.0)
    never = torch.nn.Parameter(torch.zeros(2))
    other = torch.nn.Parameter(torch.zeros(5))
    other.grad = torch.full((5,), 10.0 ** rank)
    all_reduce_gradients([used, sometimes, never, other], SeqLayout(8), bucket_elements=bucket_elements)
    return used.grad, sometimes.grad, never.grad, other.grad


@pytest.mark.parametrize("bucket_elements", [1, 7, 1 << 24])
def test_all_reduce_gradients_sums(bucket_elements):
    for used, sometimes, never, other in world(2).run(_reduce_grads, bucket_elements):
        assert torch.equal(used, torch.full((3, 2), 3.0, dtype=torch.float64))
        assert torch.equal(sometimes, torch.arange(4.0))
        assert never is None
        assert torch.equal(other, torch.full((5,), 11.0))


# -- bad input on one rank raises on every rank ----------------------------------------------------------------
def _bad_on_rank_one(case):
    rank = dist.get_rank()
    bad = rank == 1
    layout = SeqLayout(6 * dist.get_world_size())
    try:
        if case == "sdpa_mask":
            q, k, v = _bhsd()
            scaled_dot_product_attention(q, k, v, attn_mask=torch.ones(6, 6) if bad else None, enable_gqa=True,
                                         layout=layout)
        elif case == "loss_labels":
            labels = torch.zeros(1, 5 if bad else 6, dtype=torch.long)
            cross_entropy_share(torch.randn(1, 6, 4), labels, layout)
        elif case == "loss_vocab":
            cross_entropy_share(torch.randn(1, 6, 5 if bad else 4), torch.zeros(1, 6, dtype=torch.long), layout)
        elif case == "global_loss":
            global_loss(torch.ones(2) if bad else torch.ones(()), layout)
        elif case == "grad_shapes":
            p = torch.nn.Parameter(torch.zeros(3 if bad else 2))
            p.grad = torch.ones_like(p)
            all_reduce_gradients([p], layout)
    except ValueError as exc:
        return str(exc)
    return "returned"


@pytest.mark.parametrize("case, message", [
    ("sdpa_mask", "attn_mask: expected None"),
    ("loss_labels", r"labels: expected shape \(1, 6\)"),
    ("loss_vocab", "logits .vocab., dtype, device must be the same on every rank"),
    ("global_loss", r"share: expected a one-element tensor .*got shape \(2,\)"),
    ("grad_shapes", r"parameters \[shape, dtype, device\] must be the same on every rank"),
])
def test_bad_input_on_one_rank_raises_everywhere(case, message):
    results = world(2).run(_bad_on_rank_one, case, timeout=120)
    assert "returned" not in results, results
    assert re.search(message, results[1]), results
    assert re.search(message, results[0]) or "rank 1 of the group got bad input" in results[0], results


def _bad_label_on_rank_one():
    layout = SeqLayout(8)
    logits = torch.randn(1, layout.local_len, 10)
    labels = torch.zeros(1, layout.local_len, dtype=torch.long)
    if layout.rank == 1:
        labels[0, 0] = 10  # one past the vocabulary
    try:
        seqpar.nn.cross_entropy_share(logits, labels, layout)
    except ValueError as exc:
        return str(exc)
    return None


def test_bad_label_on_one_rank_raises_on_every_rank():
    messages = world(2).run(_bad_label_on_rank_one, timeout=60)
    assert all(m is not None for m in messages)
    assert "labels: expected class indices in [0, 10) or ignore_index=-100, got 10" in messages[1]
    assert "rank 1" in messages[0]


def _buckets_differ():
    layout = SeqLayout(4)
    p = torch.nn.Parameter(torch.ones(40))
    p.grad = torch.ones(40)
    try:
        seqpar.nn.all_reduce_gradients([p], layout, bucket_elements=10 if layout.rank == 0 else 30)
    except ValueError as exc:
        return str(exc)
    return None


def test_bucket_sizes_must_agree():
    for message in world(2).run(_buckets_differ, timeout=60):
        assert message is not None and "bucket_elements" in message


# -- packed documents: shard_batch, cu_seqlens_of ---------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["contiguous", "zigzag", "stripe", "balanced"])
@pytest.mark.parametrize("world_size", [2, 3])
def test_shard_batch_with_documents(world_size, scheme):
    from seqpar.nn import cu_seqlens_of

    lengths = (7, 2, 11, 1, 5)
    bounds = [0, 7, 9, 20, 21, 26]
    n = bounds[-1]
    ids = torch.arange(100, 100 + n)[None]
    labels = ids.clone()
    labels[0, 15] = -100
    in_document = torch.cat([torch.arange(m) for m in lengths])
    # the label of token i is token i + 1, except at a document's last token
    want = torch.cat([labels[0, 1:], torch.tensor([-100])])
    want[[b - 1 for b in bounds[1:]]] = -100
    batches = {
        "position_ids": {"input_ids": ids, "labels": labels, "position_ids": in_document[None]},
        "cu_seq_lens": {"input_ids": ids, "labels": labels, "cu_seq_lens_q": torch.tensor(bounds, dtype=torch.int32),
                        "cu_seq_lens_k": torch.tensor(bounds, dtype=torch.int32), "max_length_q": 11},
        "layout_only": {"input_ids": ids, "labels": labels},
    }
    for source, batch in batches.items():
        if source != "layout_only":
            assert cu_seqlens_of(batch) == bounds, source
        rebuilt = torch.full((n,), 12345)
        for rank in range(world_size):
            layout = SeqLayout.simulated(n, world_size, rank, scheme, cu_seqlens=bounds)
            out = shard_batch(batch, layout)
            positions = layout.positions()
            assert torch.equal(out["input_ids"][0], ids[0, positions]), source
            # positions inside each document, for RoPE
            assert torch.equal(out["position_ids"].reshape(-1), in_document[positions]), source
            assert torch.equal(out["position_ids"].reshape(-1), layout.document_positions())
            rebuilt[positions] = out["shift_labels"][0]
            if source == "cu_seq_lens":  # boundaries and lengths stay global, for the model's attention
                assert out["cu_seq_lens_q"].tolist() == bounds and out["max_length_q"] == 11
        assert torch.equal(rebuilt, want), source


def test_shard_batch_masks_document_ends_with_the_collator():
    """DataCollatorWithFlattening's labels (separator -100 at each document's first token), shifted
    by transformers' loss, ignore the same tokens as shard_batch on the raw labels."""
    tf = pytest.importorskip("transformers")
    from seqpar.nn import cu_seqlens_of

    docs = [[5, 6, 7, 8], [9, 10], [11, 12, 13, 14, 15]]
    collated = tf.DataCollatorWithFlattening(return_flash_attn_kwargs=True)([{"input_ids": d} for d in docs])
    bounds = cu_seqlens_of(collated)
    assert bounds == [0, 4, 6, 11]
    expected = torch.cat([collated["labels"][0, 1:], torch.tensor([-100])])  # transformers' shift
    raw = {"input_ids": collated["input_ids"], "labels": collated["input_ids"].clone()}
    layout = SeqLayout.simulated(11, 1, 0, "balanced", cu_seqlens=bounds)
    assert torch.equal(shard_batch(raw, layout)["shift_labels"][0], expected)
    assert torch.equal(shard_batch(dict(collated), layout)["shift_labels"][0], expected)


@pytest.mark.parametrize("batch, layout_documents, err, match", [
    ({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])}, None, ValueError,
     r"batch\['position_ids'\]: expected the layout's documents \[0, 8\] \(1 documents\), got \[0, 3, 8\] "
     r"\(2 documents\) \(build the layout from the batch: SeqLayout\(8, .*cu_seqlens_of\(batch\)\)\)"),
    ({"cu_seq_lens_q": torch.tensor([0, 4, 8])}, [0, 3, 8], ValueError,
     r"batch\['cu_seq_lens_q'\]: expected the layout's documents \[0, 3, 8\] \(2 documents\), got \[0, 4, 8\]"),
    ({"position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4], [0, 1, 2, 3, 0, 1, 2, 3]])}, [0, 3, 8], ValueError,
     r"batch\['position_ids'\]: expected every row to restart at the same places .*pack into batch 1.*row 1"),
    ({"position_ids": torch.tensor([0, 1, 2, 0, 1, 2, 3, 4]), "cu_seq_lens_k": [0, 4, 8]}, [0, 3, 8], ValueError,
     r"batch\['position_ids'\] \(where positions restart\): expected the documents of batch\['cu_seq_lens_k'\], "
     r"\[0, 4, 8\] \(2 documents\), got \[0, 3, 8\]"),
    ({"cu_seq_lens_q": torch.tensor([[0, 8]])}, None, ValueError,
     r"batch\['cu_seq_lens_q'\]: expected a 1-D integer tensor"),
    ({"cu_seq_lens_q": "0,8"}, None, TypeError, r"batch\['cu_seq_lens_q'\]: expected a 1-D integer tensor or a list"),
])
def test_shard_batch_documents_must_be_the_layouts(batch, layout_documents, err, match):
    with pytest.raises(err, match=match):
        shard_batch(batch, SeqLayout.simulated(8, 2, 0, "zigzag", cu_seqlens=layout_documents))


# -- a torch.distributed DeviceMesh as the group --------------------------------------------------------------
def _with_mesh():
    from torch.distributed.device_mesh import init_device_mesh

    world_size = dist.get_world_size()
    flat = init_device_mesh("cpu", (world_size,), mesh_dim_names=("cp",))
    grid = init_device_mesh("cpu", (1, world_size), mesh_dim_names=("dp", "cp"))
    try:
        SeqLayout(13, group=grid)
        refused = "returned"
    except ValueError as exc:
        refused = str(exc)
    results = {}
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 13, 2, 4, generator=gen, dtype=torch.float64) for _ in range(3))
    ids = torch.randint(0, 10, (1, 13), generator=gen)
    for name, group in (("default", None), ("mesh", flat), ("axis", grid["cp"])):
        layout = SeqLayout(13, group=group, scheme="balanced", cu_seqlens=[0, 6, 13])
        assert layout.world_size == world_size and layout.rank == dist.get_rank()
        assert layout.group is None or isinstance(layout.group, dist.ProcessGroup)
        weight = torch.ones(4, 10, dtype=torch.float64, requires_grad=True)
        out = seqpar.attention(*(layout.shard(t).clone().requires_grad_() for t in (q, k, v)), layout=layout,
                               causal=True, window_size=(3, 0))
        batch = shard_batch({"input_ids": ids, "labels": ids}, layout)
        share = cross_entropy_share((out.sum(2) @ weight), batch["shift_labels"], layout)
        share.backward()
        all_reduce_gradients([weight], layout)
        results[name] = (layout.unshard(out.detach()), global_loss(share, layout).item(), weight.grad.clone())
    return refused, results


def test_device_mesh_is_a_group():
    for refused, results in world(2).run(_with_mesh, timeout=120):
        assert re.search(r"group: expected a ProcessGroup or a 1-D DeviceMesh \(e.g. mesh\[\"dp\"\]\), got a 2-D "
                         r"DeviceMesh of shape \(1, 2\)", refused), refused
        want_out, want_loss, want_grad = results["default"]
        assert want_grad.abs().max() > 0
        for name in ("mesh", "axis"):
            out, loss, grad = results[name]
            assert torch.equal(out, want_out) and loss == want_loss and torch.equal(grad, want_grad), name
