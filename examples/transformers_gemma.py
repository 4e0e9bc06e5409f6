"""A transformers Gemma2 (sliding-window and global layers, logit softcap), sequence-parallel, against one process.

    python examples/transformers_gemma.py                       # a local gloo world of 2 ranks
    python examples/transformers_gemma.py --world-size 3 --scheme balanced
    torchrun --nproc-per-node 2 examples/transformers_gemma.py  # or under torchrun

Needs transformers (`pip install -e ".[hf]"`); nothing is downloaded: the model is a tiny,
randomly initialised Gemma2Config in float64 with 4 layers: sliding-window attention (a
window of 32 tokens, far shorter than the 203-token sequence) alternating with global
attention, the attention logits softcapped at 5 (Gemma2's is 50, which these small random
weights would never reach) and the final logits at 30. Each layer passes its
`sliding_window` and `softcap` to the attention function; seqpar serves them over the whole
sequence across ranks. Each rank reports how far its logits, the loss and the gradients
are from the same model run whole in one process, twice:
- with transformers' eager attention, whose masks (sliding window) and softcap are
  transformers' own; it computes its softmax in float32 even for a float64 model, so
  differences of 1e-7 to 1e-5 relative are that rounding (the package's tests run the
  same math in float64 and agree to 1e-11);
- with seqpar's attention on a group of one rank (the whole sequence here, no sequence
  parallelism), float64 throughout: differences are summation order only, except for the
  RMSNorm weights, whose gradients Gemma's RMSNorm sums in float32 (listed apart).
"""
import argparse

import torch
import torch.distributed as dist

import seqpar
from seqpar.integrations.transformers import register, sequence_parallel

from _launch import launch

SEQ_LEN, VOCAB, WINDOW = 203, 128, 32


def build_model(attn_implementation):
    from transformers import Gemma2Config, Gemma2ForCausalLM

    config = Gemma2Config(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
                          sliding_window=WINDOW, attn_logit_softcapping=5.0, final_logit_softcapping=30.0,
                          max_position_embeddings=SEQ_LEN, attn_implementation=attn_implementation)
    assert config.layer_types == ["sliding_attention", "full_attention"] * 2
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    model = Gemma2ForCausalLM(config).double()
    with torch.no_grad():  # larger than the init's, so that the softcap bends the scores
        for name, p in model.named_parameters():
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.normal_(0.0, 0.5)
    return model


def global_batch():
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, VOCAB, (2, SEQ_LEN), generator=gen)
    return {"input_ids": input_ids, "labels": input_ids.clone()}


def run_rank(scheme, strategy):
    """One rank's work: the sequence-parallel step, then the single-process step for comparison."""
    register()
    layout = seqpar.SeqLayout(SEQ_LEN, scheme=scheme)
    batch = global_batch()

    model = build_model("seqpar")
    local = seqpar.nn.shard_batch(batch, layout)  # input_ids, position_ids, shift_labels of this rank
    with sequence_parallel(layout, strategy=strategy):
        logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"], use_cache=False).logits
    loss = seqpar.nn.cross_entropy_share(logits, local["shift_labels"], layout)
    loss.backward()
    seqpar.nn.all_reduce_gradients(model.parameters(), layout)
    total = seqpar.nn.global_loss(loss, layout)

    reference = build_model("eager")
    ref_logits = reference(input_ids=batch["input_ids"], use_cache=False).logits
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, VOCAB),
                                                 batch["labels"][:, 1:].reshape(-1))
    ref_loss.backward()

    # the same model whole on this rank alone: seqpar attention over a group of one
    alone = [dist.new_group([r]) for r in range(layout.world_size)][layout.rank]  # every rank makes every group
    whole = seqpar.SeqLayout(SEQ_LEN, group=alone)
    single = build_model("seqpar")
    with sequence_parallel(whole):
        single_logits = single(input_ids=batch["input_ids"], position_ids=whole.positions()[None].expand(2, -1),
                               use_cache=False).logits
    single_loss = torch.nn.functional.cross_entropy(single_logits[:, :-1].reshape(-1, VOCAB),
                                                    batch["labels"][:, 1:].reshape(-1))
    single_loss.backward()

    def differences(ref_model, ref_logits, ref_loss):
        ref_local = layout.shard(ref_logits.detach())
        logits_err = ((logits.detach() - ref_local).abs().max() / ref_local.abs().max()).item()
        grad_err = {True: 0.0, False: 0.0}  # by whether the parameter is an RMSNorm weight
        for (name, p), r in zip(model.named_parameters(), ref_model.parameters()):
            err = (p.grad - r.grad).abs().max().item() / r.grad.abs().max().item()
            grad_err["norm" in name] = max(grad_err["norm" in name], err)
        loss_err = abs(total.item() - ref_loss.item()) / abs(ref_loss.item())
        return (f"loss {loss_err:.1e}, logits {logits_err:.1e}, grads {grad_err[False]:.1e} "
                f"(RMSNorm weights {grad_err[True]:.1e})")

    return (f"rank {layout.rank}/{layout.world_size} ({scheme}, {strategy}): {layout.local_len} tokens, loss "
            f"{total.item():.12f}; max relative diff from one process with transformers' eager attention: "
            f"{differences(reference, ref_logits, ref_loss)}; with seqpar's on one rank: "
            f"{differences(single, single_logits, single_loss)}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--scheme", default="zigzag", choices=["contiguous", "zigzag", "stripe", "balanced"])
    parser.add_argument("--strategy", default="ring")
    args = parser.parse_args()
    for line in launch(run_rank, args.scheme, args.strategy, world_size=args.world_size):
        print(line, flush=True)

if __name__ == "__main__":
    main()
