"""A transformers Llama, sequence-parallel through `attn_implementation="seqpar"`, against one process.

    python examples/transformers_llama.py                       # a local gloo world of 2 ranks
    python examples/transformers_llama.py --world-size 3 --scheme contiguous
    torchrun --nproc-per-node 2 examples/transformers_llama.py  # or under torchrun

Needs transformers (`pip install -e ".[hf]"`); nothing is downloaded: the model is a tiny,
randomly initialised LlamaConfig. Each rank holds its shard of the tokens, runs the model
and its backward, and reports how far its logits, loss and gradients are from the same
model run whole in one process (float64, so the differences are rounding only).
"""
import argparse

import torch

import seqpar
from seqpar.integrations.transformers import register, sequence_parallel

from _launch import launch

SEQ_LEN, VOCAB = 203, 128  # uneven on purpose


def build_model(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=SEQ_LEN,
                         attn_implementation=attn_implementation)
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return LlamaForCausalLM(config).double()


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

    reference = build_model("sdpa")
    ref_logits = reference(input_ids=batch["input_ids"], use_cache=False).logits
    ref_loss = torch.nn.functional.cross_entropy(ref_logits[:, :-1].reshape(-1, VOCAB),
                                                 batch["labels"][:, 1:].reshape(-1))
    ref_loss.backward()

    logits_err = (logits.detach() - layout.shard(ref_logits.detach())).abs().max().item()
    grad_err = max((p.grad - r.grad).abs().max().item() / r.grad.abs().max().item()
                   for p, r in zip(model.parameters(), reference.parameters()))
    return (f"rank {layout.rank}/{layout.world_size} ({scheme}, {strategy}): {layout.local_len} tokens, "
            f"loss {total.item():.12f} vs {ref_loss.item():.12f}, max |logits diff| {logits_err:.1e}, "
            f"max relative grad diff {grad_err:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--scheme", default="zigzag", choices=["contiguous", "zigzag", "stripe"])
    parser.add_argument("--strategy", default="ring")
    args = parser.parse_args()
    for line in launch(run_rank, args.scheme, args.strategy, world_size=args.world_size):
        print(line, flush=True)

if __name__ == "__main__":
    main()
