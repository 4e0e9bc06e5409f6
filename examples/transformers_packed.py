"""Sequence-parallel training of a transformers model on packed documents, against one process.

    python examples/transformers_packed.py                       # a local gloo world of 2 ranks
    python examples/transformers_packed.py --world-size 3 --steps 30
    torchrun --nproc-per-node 2 examples/transformers_packed.py  # or under torchrun

Needs transformers (`pip install -e ".[hf]"`); nothing is downloaded: the model is a tiny,
randomly initialised LlamaConfig in float64. Every step packs documents of mixed lengths
with transformers' DataCollatorWithFlattening (input_ids, labels with a -100 separator at
every document start, position_ids restarting per document, cu_seq_lens_q/k), builds the
"balanced" layout from the documents (whole short documents per rank, long ones cut so
that every rank has the same causal work), shards the batch and trains with AdamW. The
same model is trained in one process with transformers' own sdpa attention on the whole
packed sequence; each step prints both losses and the largest relative gradient
difference over all parameters (float64: the differences are rounding only).
"""
import argparse
import os

import torch

import seqpar
from seqpar.integrations.transformers import register, sequence_parallel

from _launch import launch

VOCAB = 128


def build_model(attn_implementation):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         attn_implementation=attn_implementation)
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    return LlamaForCausalLM(config).double()


def packed_batch(step):
    """Documents of mixed lengths (1 to 120 tokens, about 300 in all), packed into one row."""
    from transformers import DataCollatorWithFlattening

    gen = torch.Generator().manual_seed(1000 + step)
    documents, total = [], 0
    while total < 300:
        length = int(torch.randint(1, 121, (1,), generator=gen))
        documents.append({"input_ids": torch.randint(0, VOCAB, (length,), generator=gen).tolist()})
        total += length
    return DataCollatorWithFlattening(return_flash_attn_kwargs=True)(documents)


def run_rank(steps, scheme, strategy):
    """One rank: sequence-parallel training, and the same training in one process for comparison."""
    register()
    model, reference = build_model("seqpar"), build_model("sdpa")
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ref_optimizer = torch.optim.AdamW(reference.parameters(), lr=1e-3)
    lines, worst_loss, worst_grad = [], 0.0, 0.0
    for step in range(steps):
        batch = packed_batch(step)
        # the layout carries the documents: every rank computes the same assignment
        layout = seqpar.SeqLayout(batch["input_ids"].shape[1], scheme=scheme,
                                  cu_seqlens=seqpar.nn.cu_seqlens_of(batch))
        local = seqpar.nn.shard_batch(batch, layout)  # input_ids, position_ids (inside documents), shift_labels
        with sequence_parallel(layout, strategy=strategy):
            logits = model(input_ids=local["input_ids"], position_ids=local["position_ids"],
                           cu_seq_lens_q=local["cu_seq_lens_q"], cu_seq_lens_k=local["cu_seq_lens_k"],
                           max_length_q=local["max_length_q"], max_length_k=local["max_length_k"],
                           use_cache=False).logits
        loss = seqpar.nn.cross_entropy_share(logits, local["shift_labels"], layout)
        loss.backward()
        seqpar.nn.all_reduce_gradients(model.parameters(), layout)
        total = seqpar.nn.global_loss(loss, layout).item()

        # one process: transformers' sdpa attention, its packed-sequence mask from position_ids
        ref_logits = reference(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                               use_cache=False).logits
        ref_loss = torch.nn.functional.cross_entropy(ref_logits[0, :-1], batch["labels"][0, 1:])
        ref_loss.backward()

        grad_diff = max(((p.grad - r.grad).abs().max() / r.grad.abs().max()).item()
                        for p, r in zip(model.parameters(), reference.parameters()))
        loss_diff = abs(total - ref_loss.item()) / abs(ref_loss.item())
        worst_loss, worst_grad = max(worst_loss, loss_diff), max(worst_grad, grad_diff)
        lines.append(f"step {step:2d}: {len(layout.documents) - 1:2d} documents, {layout.seq_len} tokens, "
                     f"{layout.local_len:3d} here; loss {total:.12f} vs {ref_loss.item():.12f} "
                     f"(rel diff {loss_diff:.1e}), max relative grad diff {grad_diff:.1e}")
        for opt in (optimizer, ref_optimizer):
            opt.step()
            opt.zero_grad()
    params_diff = max(((p - r).abs().max() / r.abs().max()).item()
                      for p, r in zip(model.parameters(), reference.parameters()))
    lines.append(f"rank {layout.rank}/{layout.world_size} ({scheme}, {strategy}), {steps} steps: largest relative "
                 f"loss diff {worst_loss:.1e}, grad diff {worst_grad:.1e}, parameters after training {params_diff:.1e}")
    return lines


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world-size", type=int, default=2)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--scheme", default="balanced", choices=["balanced", "zigzag", "contiguous", "stripe"])
    parser.add_argument("--strategy", default="ring")
    args = parser.parse_args()
    results = launch(run_rank, args.steps, args.scheme, args.strategy, world_size=args.world_size, timeout=3600)
    if os.environ.get("RANK", "0") == "0":
        print("\n".join(results[0][:-1]))  # the steps, as rank 0 saw them
    for lines in results:
        print(lines[-1])

if __name__ == "__main__":
    main()
