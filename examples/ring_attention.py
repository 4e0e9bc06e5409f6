"""Ring attention over a sequence split across ranks.

    torchrun --nproc-per-node 2 examples/ring_attention.py            # 2 ranks (NCCL on GPUs, else gloo)
    python examples/ring_attention.py                                 # 1 process also works

Every rank builds the same global tensors from a seed only to check the answer; in a real
model each rank holds just its own shard.
"""
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import seqpar


def main():
    if "RANK" in os.environ:
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if use_cuda else "gloo")
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32

    seq_len, heads, kv_heads, head_dim = 4099, 8, 2, 64  # uneven on purpose
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, seq_len, h, head_dim, generator=gen).to(device, dtype) for h in (heads, kv_heads, kv_heads))

    layout = seqpar.SeqLayout(seq_len, scheme="zigzag")  # balances causal work
    q_local, k_local, v_local = (layout.shard(t).requires_grad_() for t in (q, k, v))
    with seqpar.comm.track() as stats:
        out_local = seqpar.ring_attention(q_local, k_local, v_local, layout=layout, causal=True)
    out_local.float().square().sum().backward()

    dense = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           is_causal=True, enable_gqa=True).transpose(1, 2)
    err = (out_local - layout.shard(dense)).abs().max().item()
    print(f"rank {layout.rank}/{layout.world_size}: {layout.local_len} tokens, max |out - dense| = {err:.2e}, "
          f"sent {stats.bytes_sent() / 2**20:.1f} MiB, grad dtype {q_local.grad.dtype}")
    if dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
