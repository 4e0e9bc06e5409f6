"""Real transformers model classes, sequence-parallel through `attn_implementation="seqpar"`, against one process.

Each model is built tiny from its own config class (random weights, 2 layers, float64):
Llama (packed documents given as DataCollatorWithFlattening's cu_seq_lens kwargs), Mistral
(a sliding window shorter than the sequence), Gemma2 (logit softcap, alternating sliding and
global layers), Gemma3 (alternating windows), gpt-oss (attention sinks, windows, packed
documents), DeepSeek-V3 (MLA: value head dim != query/key head dim) and Qwen2 (packed
documents given as restarting position_ids). One forward and backward per case on 2 or 3
ranks, zigzag or balanced; logits, the loss and every parameter gradient must equal one
process running transformers' eager attention math in float64 (`_dense64`) with the masks
transformers builds itself (sliding windows; packed documents detected from position_ids).

Skipped when transformers is not installed.
"""
import types
from dataclasses import dataclass
from typing import Optional, Tuple

import pytest
import torch

import seqpar
from seqpar.testing import world

transformers = pytest.importorskip("transformers")

VOCAB = 64
# float64 end to end: the sequence-parallel and single-process sums differ only in order
# (measured below 1e-13 relative on these cases); the bound leaves room for another BLAS
RTOL = 1e-11


@dataclass(frozen=True)
class Case:
    model: str
    world_size: int
    seq_len: int
    scheme: str
    documents: Optional[Tuple[int, ...]] = None  # document lengths; None: one document per row, batch 2
    collator_kwargs: bool = False  # also pass cu_seq_lens_q/k and max_length_q/k, as DataCollatorWithFlattening does
    strategy: str = "auto"


CASES = {
    "llama_p2_balanced_docs_collator": Case("llama", 2, 26, "balanced", (9, 4, 13), collator_kwargs=True),
    "mistral_p2_zigzag_window": Case("mistral", 2, 23, "zigzag"),
    "mistral_p3_balanced_window_docs": Case("mistral", 3, 31, "balanced", (14, 3, 9, 5), strategy="ring"),
    "gemma2_p2_zigzag_softcap_windows": Case("gemma2", 2, 22, "zigzag"),
    "gemma3_p3_zigzag_windows": Case("gemma3", 3, 25, "zigzag", strategy="allgather"),
    "gpt_oss_p2_balanced_sinks_docs": Case("gpt_oss", 2, 24, "balanced", (11, 6, 7)),
    "deepseek_v3_p2_zigzag_mla": Case("deepseek_v3", 2, 21, "zigzag"),
    "qwen2_p2_balanced_docs": Case("qwen2", 2, 27, "balanced", (5, 12, 3, 7)),
    "qwen2_p3_zigzag_docs": Case("qwen2", 3, 29, "zigzag", (16, 13), strategy="ring"),
}

WINDOW = 5  # shorter than every sequence above: the window masks


def _config(name, attn_implementation):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
                  attn_implementation=attn_implementation)
    if name == "llama":
        return tf.LlamaConfig(**common), tf.LlamaForCausalLM
    if name == "mistral":
        return tf.MistralConfig(sliding_window=WINDOW, **common), tf.MistralForCausalLM
    if name == "qwen2":
        return tf.Qwen2Config(**common), tf.Qwen2ForCausalLM
    if name == "gemma2":
        # a small softcap, so that tanh bends the scores of these random weights
        return tf.Gemma2Config(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW, attn_logit_softcapping=2.0,
                               final_logit_softcapping=30.0, **common), tf.Gemma2ForCausalLM
    if name == "gemma3":
        return tf.Gemma3TextConfig(head_dim=8, query_pre_attn_scalar=8, sliding_window=WINDOW,
                                   layer_types=["sliding_attention", "full_attention"], **common), tf.Gemma3ForCausalLM
    if name == "gpt_oss":
        # every expert chosen for every token: the router's top-k cannot flip on rounding
        # experts_implementation="eager": torch's grouped_mm has no float64
        return tf.GptOssConfig(head_dim=8, sliding_window=WINDOW, num_local_experts=2, num_experts_per_tok=2,
                               experts_implementation="eager", layer_types=["sliding_attention", "full_attention"],
                               **common), tf.GptOssForCausalLM
    if name == "deepseek_v3":
        common.update(num_key_value_heads=4)
        # dense layers only (first_k_dense_replace): no router; v head dim 6, q/k head dim 8 + 4
        return tf.DeepseekV3Config(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=6, first_k_dense_replace=2, n_routed_experts=2, num_experts_per_tok=1,
                                   n_group=1, topk_group=1, moe_intermediate_size=16,
                                   **common), tf.DeepseekV3ForCausalLM
    raise ValueError(name)


REFERENCE = "seqpar_test_dense64"


def _dense64(module, query, key, value, attention_mask, scaling=None, dropout=0.0, softcap=None, s_aux=None,
             sliding_window=None, **kwargs):
    """transformers' eager attention with its softmax in the input dtype (eager's is float32,
    which would make a float64 comparison meaningless): scores scaled, softcapped, masked
    with transformers' own boolean mask (sliding windows, packed documents), sinks appended."""
    assert dropout == 0.0
    rep = query.shape[1] // key.shape[1]
    k, v = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    scores = query @ k.transpose(-1, -2) * scaling
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if attention_mask is None:  # transformers' "plain causal" (or full) shortcut
        n = query.shape[2]
        attention_mask = torch.ones(n, n, dtype=torch.bool).tril() if module.is_causal else None
    position_ids = kwargs.get("position_ids")
    if position_ids is not None:
        # transformers' flash-attention convention: position_ids that restart mark packed
        # documents (its eager/sdpa masks detect them only for models that hand position_ids
        # to the mask builder; gpt-oss does not), found with transformers' own function
        from transformers.masking_utils import find_packed_sequence_indices

        ids = find_packed_sequence_indices(position_ids.expand(query.shape[0], -1))
        if ids is not None:
            same = (ids[:, :, None] == ids[:, None, :])[:, None]
            attention_mask = same if attention_mask is None else attention_mask & same
    if attention_mask is not None:
        assert attention_mask.dtype == torch.bool
        scores = scores.masked_fill(~attention_mask, float("-inf"))
    if s_aux is not None:
        sink = s_aux.reshape(1, -1, 1, 1).expand(*scores.shape[:3], 1)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    else:
        probs = torch.softmax(scores, dim=-1)
    return (probs @ v).transpose(1, 2).contiguous(), None


def _gemma_norm64(self, x):
    return self._norm(x) * (1.0 + self.weight)


def _register_reference():
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, AttentionMaskInterface

    AttentionInterface.register(REFERENCE, _dense64)
    AttentionMaskInterface.register(REFERENCE, ALL_MASK_ATTENTION_FUNCTIONS["sdpa"])


def _model(name, attn_implementation):
    from seqpar.integrations.transformers import register

    register()
    _register_reference()
    config, cls = _config(name, attn_implementation)
    model = cls(config).double()
    for module in model.modules():
        if type(module).__name__ in ("Gemma2RMSNorm", "Gemma3RMSNorm"):
            # Gemma normalises in float32 whatever the model's dtype; in float64 here, so the
            # comparison measures attention, not float32 rounding of the norms
            module.forward = types.MethodType(_gemma_norm64, module)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # independent of transformers' init code and of the process
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3 + (1.0 if p.dim() == 1 else 0.0))
    return model


def _bounds(case):
    if case.documents is None:
        return None
    assert sum(case.documents) == case.seq_len
    out = [0]
    for n in case.documents:
        out.append(out[-1] + n)
    return out


def _batch(case):
    """The global batch: raw labels (no separator at document starts: shard_batch must mask
    the document ends itself), position_ids restarting per document when packed."""
    gen = torch.Generator().manual_seed(1)
    rows = 1 if case.documents else 2
    ids = torch.randint(0, VOCAB, (rows, case.seq_len), generator=gen)
    labels = ids.clone()
    labels[torch.rand(ids.shape, generator=gen) < 0.2] = -100
    batch = {"input_ids": ids, "labels": labels}
    bounds = _bounds(case)
    if bounds:
        batch["position_ids"] = torch.cat([torch.arange(n) for n in case.documents])[None]
        if case.collator_kwargs:
            batch["cu_seq_lens_q"] = batch["cu_seq_lens_k"] = torch.tensor(bounds, dtype=torch.int32)
            batch["max_length_q"] = batch["max_length_k"] = max(case.documents)
    return batch


def _single_process(case):
    """One process, transformers' masks (windows, packed documents from position_ids), float64 throughout."""
    model = _model(case.model, REFERENCE)
    batch = _batch(case)
    kwargs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits
    labels = batch["labels"].clone()
    bounds = _bounds(case)
    if bounds:
        labels[:, bounds[1:-1]] = -100  # a document's last token does not predict the next one's first
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1))
    loss.backward()
    return logits.detach(), loss.item(), {n: p.grad.clone() for n, p in model.named_parameters()}


def _sequence_parallel(case):
    from seqpar.integrations.transformers import sequence_parallel

    model = _model(case.model, "seqpar")
    batch = _batch(case)
    layout = seqpar.SeqLayout(case.seq_len, scheme=case.scheme, cu_seqlens=seqpar.nn.cu_seqlens_of(batch))
    assert (layout.cu_seqlens is None) == (case.documents is None)
    local = seqpar.nn.shard_batch(batch, layout)
    extra = {k: local[k] for k in ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k") if k in local}
    with sequence_parallel(layout, strategy=case.strategy):
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False,
                       **extra).logits
    share = seqpar.nn.cross_entropy_share(logits, local["shift_labels"], layout)
    share.backward()
    seqpar.nn.all_reduce_gradients(model.parameters(), layout)
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return layout.unshard(logits.detach(), dim=1), seqpar.nn.global_loss(share, layout).item(), grads


def _rel(got, want):
    return ((got - want).abs().max() / want.abs().max()).item()


@pytest.mark.parametrize("name", list(CASES))
def test_model_matches_single_process(name):
    case = CASES[name]
    ref_logits, ref_loss, ref_grads = _single_process(case)
    results = world(case.world_size).run(_sequence_parallel, case, timeout=240)
    for rank, (logits, loss, grads) in enumerate(results):
        assert logits.shape == ref_logits.shape
        assert _rel(logits, ref_logits) <= RTOL, (rank, _rel(logits, ref_logits))
        assert abs(loss - ref_loss) <= RTOL * abs(ref_loss), (rank, loss, ref_loss)
        assert grads.keys() == ref_grads.keys()
        for pname, want in ref_grads.items():
            if want.abs().max() == 0:
                # only parameters that cannot matter may have no gradient (e.g. an unused expert's bias)
                assert grads[pname].abs().max() == 0, (rank, pname)
                continue
            assert _rel(grads[pname], want) <= RTOL, (rank, pname, _rel(grads[pname], want))
