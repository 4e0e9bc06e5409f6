"""gpt-oss (attention sinks) or DeepSeek-V3 (MLA: a value head dim of its own), sequence-parallel, against one process.

    python examples/transformers_sinks_mla.py --model gpt_oss        # a local gloo world of 2 ranks
    python examples/transformers_sinks_mla.py --model deepseek_v3 --world-size 3 --scheme balanced
    torchrun --nproc-per-node 2 examples/transformers_sinks_mla.py --model gpt_oss

Needs transformers (`pip install -e ".[hf]"`); nothing is downloaded: each model is a tiny,
randomly initialised config in float64.
- gpt-oss: attention sinks (one learned logit per head, passed to attention as `s_aux`),
  sliding-window layers (a window of 16 tokens) alternating with global ones, and a
  mixture of experts with every expert chosen for every token (so that the router's top-k
  cannot flip on rounding).
- DeepSeek-V3: multi-head latent attention, whose queries and keys have head dim 8 + 4
  (no-RoPE and RoPE parts) and whose values head dim 6; dense layers only.

Each rank runs one forward and backward of its tokens under seqpar, then the same model
whole in one process with seqpar's attention on a group of one rank (float64 throughout:
the differences are summation order), and reports the largest relative difference of its
logits, the loss and every gradient (the sinks' gradients summed over the group, as for
every replicated parameter).
"""
import argparse

import torch
import torch.distributed as dist

import seqpar
from seqpar.integrations.transformers import register, sequence_parallel

from _launch import launch

SEQ_LEN, VOCAB = 97, 96


def build_model(name, attn_implementation):
    import transformers as tf

    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
                  attn_implementation=attn_implementation)
    if name == "gpt_oss":
        config = tf.GptOssConfig(head_dim=8, sliding_window=16, num_local_experts=2, num_experts_per_tok=2,
                                 experts_implementation="eager", layer_types=["sliding_attention", "full_attention"],
                                 **common)
        cls = tf.GptOssForCausalLM
    else:
        common.update(num_key_value_heads=4)
        config = tf.DeepseekV3Config(q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                     v_head_dim=6, first_k_dense_replace=2, n_routed_experts=2, num_experts_per_tok=1,
                                     n_group=1, topk_group=1, moe_intermediate_size=16, **common)
        cls = tf.DeepseekV3ForCausalLM
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    model = cls(config).double()
    if name == "gpt_oss":
        with torch.no_grad():  # sinks of a visible size (their init is zero-mean and small)
            for p_name, p in model.named_parameters():
                if p_name.endswith("sinks"):
                    p.normal_(0.0, 2.0)
    return model


def run_rank(name, scheme, strategy):
    register()
    layout = seqpar.SeqLayout(SEQ_LEN, scheme=scheme)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (1, SEQ_LEN), generator=gen)
    batch = {"input_ids": input_ids, "labels": input_ids.clone()}

    model = build_model(name, "seqpar")
    local = seqpar.nn.shard_batch(batch, layout)
    with sequence_parallel(layout, strategy=strategy):
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    loss = seqpar.nn.cross_entropy_share(logits, local["shift_labels"], layout)
    loss.backward()
    seqpar.nn.all_reduce_gradients(model.parameters(), layout)
    total = seqpar.nn.global_loss(loss, layout)

    # the same model whole on this rank alone: seqpar attention over a group of one
    alone = [dist.new_group([r]) for r in range(layout.world_size)][layout.rank]  # every rank makes every group
    whole = seqpar.SeqLayout(SEQ_LEN, group=alone)
    single = build_model(name, "seqpar")
    with sequence_parallel(whole):
        ref_logits = single(input_ids=input_ids, position_ids=whole.positions()[None], use_cache=False).logits
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[0, :-1], input_ids[0, 1:])
    ref_loss.backward()

    ref_local = layout.shard(ref_logits.detach())
    logits_err = ((logits.detach() - ref_local).abs().max() / ref_local.abs().max()).item()
    grad_err, sinks_err = 0.0, None
    for (p_name, p), r in zip(model.named_parameters(), single.parameters()):
        if r.grad is None or r.grad.abs().max() == 0:
            continue
        err = (p.grad - r.grad).abs().max().item() / r.grad.abs().max().item()
        grad_err = max(grad_err, err)
        if p_name.endswith("sinks"):
            sinks_err = err if sinks_err is None else max(sinks_err, err)
    loss_err = abs(total.item() - ref_loss.item()) / abs(ref_loss.item())
    extra = "" if sinks_err is None else f" (sinks {sinks_err:.1e})"
    return (f"rank {layout.rank}/{layout.world_size} {name} ({scheme}, {strategy}): {layout.local_len} tokens, loss "
            f"{total.item():.12f}; max relative diff from one process: loss {loss_err:.1e}, logits {logits_err:.1e}, "
            f"grads {grad_err:.1e}{extra}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt_oss", choices=["gpt_oss", "deepseek_v3"])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--scheme", default="zigzag", choices=["contiguous", "zigzag", "stripe", "balanced"])
    parser.add_argument("--strategy", default="auto")
    args = parser.parse_args()
    for line in launch(run_rank, args.model, args.scheme, args.strategy, world_size=args.world_size):
        print(line, flush=True)

if __name__ == "__main__":
    main()
