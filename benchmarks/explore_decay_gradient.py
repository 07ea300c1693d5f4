"""Numerical experiment (CPU, fp64): the decay gradient of the chunked backward as a recurrence.

    python benchmarks/explore_decay_gradient.py [T] [gate_shift]      (defaults 16384, 3.0)

The backward needs, per chunk n, dL/dbeta_n = <dR_{n+1}, R_{n+1}> (every term of the state after
the chunk carries e^{beta_n}). The reverse scan takes it directly, and for that reads every forward
state R_{n+1} once more: 1.09 GB at 64k tokens, 16 heads, d = 64, about 0.44 ms of the reverse
scan's 1.24 (benchmarks/RESULTS.md, attention kernels, run T).

With X_n = <dR_n, R_n>, dR_n = e^{beta_n} dR_{n+1} + Q_n and R_{n+1} = e^{beta_n} R_n + K_n give

    X_{n+1} = X_n - A_n + B_n,   A_n = <Q_n, R_n>,   B_n = <dR_{n+1}, K_n>,

and A_n, B_n are per-token sums the backward kernels already form (the state parts of bwd_q's and
bwd_kv's gate gradients). So the reverse scan could read R only at every K-th slot (an anchor X_a)
and the decay gradient be X_a + sum_{m=a..n} (B_m - A_m). The recurrence does not decay: each
chunk's error (the states are stored in bf16) stays in every later term until the next anchor.

This script measures that error on one head: q, k, v, dO and delta random (bf16 inputs), gates
logsigmoid(randn + gate_shift) (a shift of 100 or more: no gates), the states exact in fp64 and as
the kernels store them (unweighted, rounded to bf16; the z column in fp32). It prints the relative
error (norm over chunks) of the direct form from the stored states and of the recurrence anchored
every K chunks, both against the exact fp64 decay gradient.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F

from power_transformers.kernels.reference import symmetric_power_embedding

HEAD_DIM = 64
CHUNK = 256


def bf16(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.bfloat16).to(torch.float64)


def simulate(t: int, gate_shift: float, seed: int = 0) -> dict:
    """One head of t tokens (a multiple of CHUNK): the exact decay gradients [N], the direct form from the
    stored states [N], A and B [N], and the inner products <dR_a, R_a> of the stored states [N + 1] (the
    anchors); also the exact states' inner products, with which the recurrence is exact."""
    torch.manual_seed(seed)
    d, c = HEAD_DIM, CHUNK
    n_chunks = t // c
    q, k, v = (bf16(torch.randn(t, d, dtype=torch.float64)) for _ in range(3))
    do = bf16(0.05 * torch.randn(t, d, dtype=torch.float64))
    delta = 0.05 * torch.randn(t, dtype=torch.float64)
    gated = gate_shift < 100
    log_g = F.logsigmoid(torch.randn(t, dtype=torch.float64) + gate_shift) if gated else torch.zeros(t, dtype=torch.float64)
    # the states with their z column: values [v, 1], output gradients [do, delta]
    values = torch.cat([v, torch.ones(t, 1, dtype=torch.float64)], 1)
    grads = torch.cat([do, delta[:, None]], 1)
    dim = d * (d + 1) // 2

    states, key_shares, query_shares, betas = [torch.zeros(dim, d + 1, dtype=torch.float64)], [], [], []
    for n in range(n_chunks):
        rows = slice(n * c, (n + 1) * c)
        b = log_g[rows].cumsum(0)
        betas.append(b[-1])
        key_shares.append(symmetric_power_embedding(k[rows], 2).T @ (torch.exp(b[-1] - b)[:, None] * values[rows]))
        query_shares.append(symmetric_power_embedding(d**-0.5 * q[rows], 2).T @ (torch.exp(b)[:, None] * grads[rows]))
        states.append(torch.exp(b[-1]) * states[-1] + key_shares[-1])
    dstates = [torch.zeros(dim, d + 1, dtype=torch.float64)]
    for n in range(n_chunks - 1, -1, -1):
        dstates.insert(0, torch.exp(betas[n]) * dstates[0] + query_shares[n])

    # as stored: unweighted (the pair weights w divided out), bf16; the z column fp32
    w = symmetric_power_embedding(torch.ones(1, d, dtype=torch.float64), 2)[0][:, None]

    def stored(x: torch.Tensor) -> torch.Tensor:
        y = x.clone()
        y[:, :d] = bf16(x[:, :d] / w) * w
        return y

    st, dst = [stored(x) for x in states], [stored(x) for x in dstates]
    return dict(
        exact=torch.stack([(dstates[n + 1] * states[n + 1]).sum() for n in range(n_chunks)]),
        direct=torch.stack([(dst[n + 1] * st[n + 1]).sum() for n in range(n_chunks)]),
        a=torch.stack([(query_shares[n] * st[n]).sum() for n in range(n_chunks)]),
        b=torch.stack([(dst[n + 1] * key_shares[n]).sum() for n in range(n_chunks)]),
        anchors=torch.stack([(dst[n] * st[n]).sum() for n in range(n_chunks + 1)]),
        exact_a=torch.stack([(query_shares[n] * states[n]).sum() for n in range(n_chunks)]),
        exact_b=torch.stack([(dstates[n + 1] * key_shares[n]).sum() for n in range(n_chunks)]),
        exact_anchors=torch.stack([(dstates[n] * states[n]).sum() for n in range(n_chunks + 1)]),
    )


def recurrence(anchors: torch.Tensor, a: torch.Tensor, b: torch.Tensor, every: int) -> torch.Tensor:
    """dL/dbeta_n = X_m + sum_{j = m..n} (B_j - A_j), m = every * floor(n / every): [N]."""
    return torch.stack([anchors[(n // every) * every] + (b[(n // every) * every:n + 1] - a[(n // every) * every:n + 1]).sum()
                        for n in range(a.shape[0])])


def main() -> int:
    t = int(sys.argv[1]) if len(sys.argv) > 1 else 16384
    gate_shift = float(sys.argv[2]) if len(sys.argv) > 2 else 3.0
    r = simulate(t, gate_shift)
    n_chunks = t // CHUNK

    def rel(x: torch.Tensor) -> float:
        return ((x - r["exact"]).norm() / r["exact"].norm()).item()

    print(f"T {t}, {n_chunks} chunks of {CHUNK}, "
          + (f"gates logsigmoid(randn + {gate_shift})" if gate_shift < 100 else "no gates"))
    print(f"  mean |dL/dbeta| {r['exact'].abs().mean():.3e}, |A| {r['a'].abs().mean():.3e}, |B| {r['b'].abs().mean():.3e}")
    print(f"  direct, from the stored states: {rel(r['direct']):.2e}")
    for every in sorted({1, 2, 4, 8, 16, 64, n_chunks}):
        print(f"  recurrence, anchored every {every:4d} chunks: {rel(recurrence(r['anchors'], r['a'], r['b'], every)):.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
