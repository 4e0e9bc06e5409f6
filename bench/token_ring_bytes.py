"""Bytes per rank and direction: TokenRing (both routes) against ring, from the exact
per-layout formulas (`analytic_bytes`, which tests/strategies assert equal the counted
bytes). No communication runs: the layouts are simulated. Prints a Markdown table.

    python bench/token_ring_bytes.py
"""
from seqpar.attention import analytic_bytes
from seqpar.layout import SeqLayout

MIB = 2 ** 20


def row(world, seq_len, heads, kv_heads, scheme, causal, elem=2, batch=1, head_dim=128):
    """{(route, key): [bytes of each rank]} for TokenRing's routes and ring."""
    table = {}
    for rank in range(world):
        layout = SeqLayout.simulated(seq_len, world, rank, scheme)
        ring = analytic_bytes("ring", layout, batch, heads, kv_heads, head_dim, elem, causal=causal)
        table.setdefault(("ring", "forward"), []).append(ring["forward"])
        table.setdefault(("ring", "backward"), []).append(ring["backward"])
        for route in ("direct", "ring"):
            tr = analytic_bytes("token_ring", layout, batch, heads, kv_heads, head_dim, elem, route=route, causal=causal)
            for key in ("forward_outgoing", "forward_returning", "backward_outgoing", "backward_returning"):
                table.setdefault((route, key), []).append(tr[key])
    return table


def main():
    print("| P | H / H_kv | scheme, causal | ring fwd | TokenRing direct fwd: queries / partials | "
          "ring-route fwd: queries / partials | ring bwd | TokenRing direct bwd: q,dO,out,lse / dQ |")
    print("|---|---|---|---|---|---|---|---|")
    fmt = lambda xs: f"{sum(xs) / len(xs) / MIB:.0f} ({max(xs) / MIB:.0f})"
    for world in (4, 8):
        for heads, kv_heads in ((32, 32), (32, 8)):
            for scheme, causal in (("zigzag", True), ("contiguous", True), ("zigzag", False)):
                t = row(world, 131072, heads, kv_heads, scheme, causal)
                print(f"| {world} | {heads}/{kv_heads} | {scheme}, {causal} | {fmt(t[('ring', 'forward')])} | "
                      f"{fmt(t[('direct', 'forward_outgoing')])} / {fmt(t[('direct', 'forward_returning')])} | "
                      f"{fmt(t[('ring', 'forward_outgoing')])} / {fmt(t[('ring', 'forward_returning')])} | "
                      f"{fmt(t[('ring', 'backward')])} | "
                      f"{fmt(t[('direct', 'backward_outgoing')])} / {fmt(t[('direct', 'backward_returning')])} |")
    print("\nMiB sent per rank: mean over ranks (busiest rank); N = 128K, bf16, B=1, D=128. Ring sends all "
          "of it in one direction; TokenRing's queries and partials go in opposite directions.")


if __name__ == "__main__":
    main()
