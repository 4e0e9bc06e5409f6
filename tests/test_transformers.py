"""seqpar as a transformers attention implementation: a tiny Llama, sequence-parallel vs single-process.

Skipped when transformers is not installed (it is optional: `pip install seqpar[hf]`).
float64 throughout, so logits, loss and gradients must agree to `FLOAT64_RTOL` relative.
"""
import re

import pytest
import torch
import torch.distributed as dist

import seqpar
from seqpar.testing import FLOAT64_RTOL, world

transformers = pytest.importorskip("transformers")


def _model(attn_implementation, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from seqpar.integrations.transformers import register

    register()
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=False, attn_implementation=attn_implementation)
    model = LlamaForCausalLM(config).double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # independent of transformers' init code and of the process
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _batch(seq_len, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (2, seq_len), generator=gen)
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=gen) < 0.2] = -100
    return {"input_ids": ids, "labels": labels}


def _single_process(seq_len):
    """transformers' own sdpa attention; the loss in float64 (transformers' loss upcasts only to float32)."""
    model = _model("sdpa")
    batch = _batch(seq_len)
    logits = model(input_ids=batch["input_ids"], use_cache=False).logits
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 64), batch["labels"][:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _sequence_parallel(seq_len, scheme, strategy):
    from seqpar.integrations.transformers import sequence_parallel

    model = _model("seqpar")
    layout = seqpar.SeqLayout(seq_len, scheme=scheme)
    local = seqpar.nn.shard_batch(_batch(seq_len), layout)
    with sequence_parallel(layout, strategy=strategy):
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    share = seqpar.nn.cross_entropy_share(logits, local["shift_labels"], layout)
    share.backward()
    seqpar.nn.all_reduce_gradients(model.parameters(), layout)
    full_logits = layout.unshard(logits.detach(), dim=1)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return full_logits, seqpar.nn.global_loss(share, layout).item(), grads


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("world_size, seq_len, scheme, strategy", [
    (2, 21, "zigzag", "ring"),
    (3, 20, "contiguous", "ring"),
    (2, 17, "stripe", "ulysses"),
])
def test_llama_logits_loss_grads_match_single_process(world_size, seq_len, scheme, strategy):
    ref_logits, ref_loss, ref_grads = _single_process(seq_len)
    for rank, (logits, loss, grads) in enumerate(world(world_size).run(_sequence_parallel, seq_len, scheme, strategy)):
        assert _rel(logits, ref_logits) <= FLOAT64_RTOL, rank
        assert abs(loss - ref_loss) <= FLOAT64_RTOL * abs(ref_loss), (rank, loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for name, want in ref_grads.items():
            assert want.abs().max() > 0, name
            assert _rel(grads[name], want) <= FLOAT64_RTOL, (rank, name, _rel(grads[name], want))


def _misuse(case):
    """Every rank runs the model; only rank 1 gets it wrong (default positions: every rank but 0 is wrong)."""
    from seqpar.integrations.transformers import sequence_parallel

    model = _model("seqpar")
    rank = dist.get_rank()
    documents = [0, 7, 12 * dist.get_world_size()] if case.startswith("documents") else None
    layout = seqpar.SeqLayout(12 * dist.get_world_size(), cu_seqlens=documents)
    local = seqpar.nn.shard_batch(_batch(layout.seq_len), layout)
    kwargs = dict(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False)
    if case == "padding" and rank == 1:
        mask = torch.ones_like(local["input_ids"])
        mask[0, -3:] = 0
        kwargs["attention_mask"] = mask
    elif case == "default_positions":
        del kwargs["position_ids"]  # transformers then uses arange(local_len): right on rank 0 only
    elif case == "dropout" and rank == 1:
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.1
        model.train()
    elif case == "packed_without_documents" and rank == 1:
        positions = kwargs["position_ids"].clone()
        positions[:, 5:] = torch.arange(positions.shape[1] - 5)  # a document the layout does not know
        kwargs["position_ids"] = positions
    elif case == "documents_positions":
        kwargs["position_ids"] = layout.positions()[None]  # global positions: the model sees one document
    elif case == "documents_cu_seq_lens" and rank == 1:
        kwargs["cu_seq_lens_q"] = kwargs["cu_seq_lens_k"] = torch.tensor([0, 8, layout.seq_len], dtype=torch.int32)
    try:
        with sequence_parallel(layout):
            model(**kwargs)
    except ValueError as exc:
        return str(exc)
    return "returned"


@pytest.mark.parametrize("case, message", [
    ("padding", "attention_mask: expected None .* 3 padded token.*pack instead.*cu_seqlens"),
    ("default_positions", "position_ids: expected the layout's global positions"),
    ("dropout", "dropout: expected 0.0"),
    ("packed_without_documents", r"position_ids: expected the layout's global positions .*SeqLayout\(seq_len, "
                                 r"cu_seqlens=...\).*index 5: expected \[2:9\] = \[14, 15, 16, 17, 18, 19, 20\], "
                                 r"got \[14, 15, 16, 0, 1, 2, 3\]"),
    ("documents_positions", "position_ids: expected each token's position inside its document"),
    ("documents_cu_seq_lens", r"cu_seq_lens_q: expected the layout's global document boundaries layout.cu_seqlens = "
                              r"\[0, 7, 24\] \(2 documents\), got \[0, 8, 24\]"),
])
def test_misuse_raises_on_every_rank(case, message):
    import re

    results = world(2).run(_misuse, case, timeout=120)
    # the rank that got the bad input names the problem; its peer is told which rank did
    assert any(re.search(message, r) for r in results), results
    for r in results:
        assert r != "returned" and (re.search(message, r) or "rank 1 of the group got bad input" in r), results


def _empty_rank():
    from seqpar.integrations.transformers import sequence_parallel

    model = _model("seqpar")
    # zigzag cuts each one-token document into 2P chunks: rank 1 holds no token
    layout = seqpar.SeqLayout(6, scheme="zigzag", cu_seqlens=[0, 1, 2, 3, 4, 5, 6])
    local = seqpar.nn.shard_batch({"input_ids": torch.arange(6)[None]}, layout)
    try:
        with sequence_parallel(layout):
            model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False)
    except ValueError as exc:
        return layout.local_len, str(exc)
    return layout.local_len, "returned"


def test_a_rank_without_tokens_raises_on_every_rank():
    """transformers fails on an empty shard before attention; the block refuses it on every rank at once."""
    results = world(2).run(_empty_rank, timeout=120)
    assert [n for n, _ in results] == [6, 0]
    for _, message in results:
        assert re.search(r"layout: expected every rank to hold at least one token .*got local lengths \[6, 0\] "
                         r"\(zigzag over 2 ranks, 6 documents\): rank\(s\) \[1\] hold none", message), message


def test_register_is_idempotent():
    from transformers import AttentionInterface

    from seqpar.integrations.transformers import attention_forward, register

    assert register() == "seqpar" and register() == "seqpar"
    assert AttentionInterface()["seqpar"] is attention_forward


def test_refusals_name_every_argument_in_one_line_without_printing_tensors():
    from seqpar.integrations.transformers import attention_forward

    q = torch.randn(1, 4, 6, 8)  # [B, H, S, D], one process
    bias = torch.randn(1, 4, 6, 6)
    with pytest.raises(ValueError) as info:
        attention_forward(torch.nn.Module(), q, q[:, :2], q[:, :2], None, position_bias=bias, head_mask=torch.ones(4))
    message = str(info.value)
    assert "\n" not in message and "tensor([" not in message, message
    for part in ("position_bias: expected None, got a tensor of shape (1, 4, 6, 6), dtype torch.float32",
                 "head_mask: expected None, got a tensor of shape (4,)"):
        assert part in message, message


@pytest.mark.parametrize("kwargs, message", [
    (dict(sliding_window=0), r"sliding_window: expected None or a positive int .*got 0"),
    (dict(sliding_window=2.5), r"sliding_window: expected None or a positive int .*got 2.5"),
    (dict(s_aux=torch.zeros(64)), r"sinks: expected shape \[4\] \(one logit per query head\), got \(64,\)"),
    (dict(softcap=-1.0), r"softcap: expected a finite float >= 0"),
    (dict(cu_seq_lens_q=torch.tensor([0, 3, 6])), r"cu_seq_lens_q: expected .* = \[0, 6\] \(1 documents\), got "
                                                  r"\[0, 3, 6\] \(2 documents\); the layout has no documents"),
    (dict(max_length_q=3), r"max_length_q: expected 6, the length of the layout's longest document, got 3"),
])
def test_bad_mask_arguments_name_the_argument(kwargs, message):
    from seqpar.integrations.transformers import attention_forward

    q = torch.randn(1, 4, 6, 8, dtype=torch.float64)
    with pytest.raises((ValueError, TypeError), match=message):
        attention_forward(torch.nn.Module(), q, q[:, :2], q[:, :2], None, **kwargs)


def _dense(q, k, v, visible, scale, softcap=0.0, sinks=None):
    """[B, H, S, D] attention with a boolean [S, S] visibility, float64."""
    k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], 1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) * scale
    if softcap:
        scores = softcap * torch.tanh(scores / softcap)
    scores = scores.masked_fill(~visible, float("-inf"))
    if sinks is not None:
        scores = torch.cat([scores, sinks.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)], -1)
    probs = torch.softmax(scores, -1)[..., :visible.shape[-1]]
    return (probs @ v).transpose(1, 2)


@pytest.mark.parametrize("is_causal", [True, False])
@pytest.mark.parametrize("window", [1, 3, 11, 12])
def test_sliding_window_is_transformers_convention(is_causal, window):
    """Key j visible to query i when i - j < w (causal; transformers' masks), |i - j| < w
    (bidirectional: flash-attention's window_size=(w-1, w-1), Gemma3's mask); with softcap and sinks."""
    from seqpar.integrations.transformers import attention_forward

    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 11, 8, generator=gen, dtype=torch.float64) for h in (4, 2, 2))
    sinks = torch.randn(4, generator=gen, dtype=torch.float64)
    module = torch.nn.Module()
    module.is_causal = is_causal
    out, _ = attention_forward(module, q, k, v, None, scaling=0.4, sliding_window=window, softcap=1.5, s_aux=sinks)
    i, j = torch.arange(11)[:, None], torch.arange(11)[None]
    visible = ((i - j < window) & (j <= i)) if is_causal else ((i - j).abs() < window)
    want = _dense(q, k, v, visible, 0.4, softcap=1.5, sinks=sinks)
    assert (out - want).abs().max() <= 1e-12 * want.abs().max()


def test_position_message_shows_where_positions_differ():
    from seqpar.integrations.transformers import attention_forward

    q = torch.randn(1, 2, 12, 8)
    positions = torch.arange(12)[None].clone()
    positions[0, 9:] = torch.arange(3)  # a packed second document starting at index 9
    with pytest.raises(ValueError, match=r"SeqLayout\(seq_len, cu_seqlens=...\).* got 3 that differ, the first at "
                                         r"row 0, "
                                         r"index 9: expected \[6:12\] = "
                                         r"\[6, 7, 8, 9, 10, 11\], got \[6, 7, 8, 0, 1, 2\]"):
        attention_forward(torch.nn.Module(), q, q, q, None, position_ids=positions)
