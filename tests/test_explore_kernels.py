"""The experiment kernels of benchmarks/explore_state_products.py under
Triton's interpreter: each variant against a PyTorch computation, so that the figures they give on
the GPU are of correct kernels. Tiny shapes, fp32."""

import itertools
import os
import sys

import pytest
import torch

pytest.importorskip("triton")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))

import explore_state_products as esp  # noqa: E402

D, T, C, H = 32, 64, 32, 2
N, NB = T // C, D // esp.BLOCK


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    dim = D * (D + 1) // 2
    x, y = torch.randn(H, T, D, generator=g), torch.randn(H, T, D, generator=g)
    w, st = torch.rand(H, T, generator=g), torch.randn(H, N, dim, D, generator=g)
    pairs = list(itertools.combinations_with_replacement(range(D), 2))
    mult = torch.tensor([1.0 if i == j else 2.0 for i, j in pairs])
    xx = torch.stack([x[..., i] * x[..., j] for i, j in pairs], -1)  # [H, T, D'] unweighted pairs
    return x, y, w, st, xx, mult, st[:, :, esp.block_layout_index(D)].contiguous()


@pytest.mark.parametrize("variant", [0, 1, 2, 3])
def test_query_variants(data, variant):
    x, _, _, st, xx, mult, st_blocks = data
    ref = torch.einsum("hntp,hnpe->hnte", (xx * mult).view(H, N, C, -1), st).reshape(H, T, D)
    state = st_blocks if variant == 3 else st
    out = torch.zeros(H, T, D)
    esp._query_kernel[(N, H)](x, state, out, T, N, CHUNK=C, HEAD_DIM=D, D=state.shape[2], VARIANT=variant, NB=NB)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_share_variants(data, variant):
    x, y, w, _, xx, _, _ = data
    ref = torch.einsum("hncp,hnce->hnpe", (xx * w[..., None]).view(H, N, C, -1), y.view(H, N, C, D))
    rows = esp.block_layout_index(D).numel() if variant == 2 else ref.shape[2]
    out = torch.zeros(H, N, rows, D)
    esp._share_kernel[(N, H)](x, y, w, out, T, N, CHUNK=C, HEAD_DIM=D, D=rows, VARIANT=variant, NB=NB)
    if variant == 2:
        out = out[:, :, esp.pair_layout_index(D)]
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("variant", [0, 1])
def test_query_gradient_variants(data, variant):
    x, y, _, st, _, mult, st_blocks = data
    xr = x.clone().requires_grad_()
    pairs = list(itertools.combinations_with_replacement(range(D), 2))
    xx = torch.stack([xr[..., i] * xr[..., j] for i, j in pairs], -1)
    (torch.einsum("hntp,hnpe->hnte", (xx * mult).view(H, N, C, -1), st).reshape(H, T, D) * y).sum().backward()
    state = st_blocks if variant == 1 else st
    out = torch.zeros(H, T, D)
    esp._dq_kernel[(N, H)](x, y, state, out, T, N, CHUNK=C, HEAD_DIM=D, D=state.shape[2], VARIANT=variant, NB=NB)
    assert rel(out, xr.grad) < 1e-5


# The GPU machine's Triton (3.6), which CI installs beside the current one (tests/test_triton_kernels.py)
GPU_TRITONS = [p for p in os.environ.get("POWER_TEST_EXTRA_TRITONS", "").split(os.pathsep) if p]


def compile_only(script, triton_path, variants):
    """The `ok` lines of benchmarks/`script` --compile-only run with the Triton at triton_path (a
    subprocess without the interpreter), after asserting that it exits 0 with `variants` of them and
    no failure."""
    import subprocess

    env = dict(os.environ, TRITON_INTERPRET="0",
               PYTHONPATH=os.pathsep.join([os.path.abspath(triton_path), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "..", "benchmarks", script),
                           "--compile-only"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith(("ok ", "FAILED"))]
    assert len(lines) == variants and all(ln.startswith("ok ") for ln in lines), done.stdout
    return lines


@pytest.mark.parametrize("triton_path", GPU_TRITONS)
def test_gluon_share_exploration_compiles_for_hopper(triton_path):
    """benchmarks/explore_gluon_share.py (Gluon kernels cannot run under the interpreter; their GPU run
    checks them against torch) compiles every variant for sm_90 with the GPU machine's Triton, without
    spills: the script is written against Triton 3.6's Gluon API."""
    assert all("spill stores 0 B" in ln for ln in compile_only("explore_gluon_share.py", triton_path, 13))


@pytest.mark.parametrize("triton_path", GPU_TRITONS)
def test_gluon_share_kernel_compiles_for_hopper(triton_path):
    """power_transformers/kernels/gluon_share.py, which the chunked forward takes on Hopper at d = 64,
    C = 256 (its GPU check: benchmarks/check_gluon_share.py and check_gpu.py), compiles for sm_90 with the
    GPU machine's Triton (the forward's pass, the backward's and two variants); the forward's default without
    spills (the backward's spills 40 bytes, ptxas sm_90)."""
    assert "spill stores 0 B" in compile_only("check_gluon_share.py", triton_path, 4)[0]


def test_the_decay_gradient_recurrence_is_exact_for_exact_states():
    """benchmarks/explore_decay_gradient.py rests on X_{n+1} = X_n - A_n + B_n: with the exact states the
    recurrence from X_0 alone gives every chunk's <dR_{n+1}, R_{n+1}>; from the stored (bf16) states it
    is off by about the bf16 rounding, and anchoring every chunk stays close to the direct form."""
    import explore_decay_gradient as edg

    r = edg.simulate(4 * edg.CHUNK, 3.0)
    exact = edg.recurrence(r["exact_anchors"], r["exact_a"], r["exact_b"], every=4)
    torch.testing.assert_close(exact, r["exact"], rtol=1e-10, atol=1e-10 * r["exact"].abs().max().item())
    stored = edg.recurrence(r["anchors"], r["a"], r["b"], every=1)
    direct_err = ((r["direct"] - r["exact"]).norm() / r["exact"].norm()).item()
    stored_err = ((stored - r["exact"]).norm() / r["exact"].norm()).item()
    assert 1e-5 < direct_err < 1e-2 and stored_err < 2 * direct_err


def test_split_k_exploration_matches_torch(monkeypatch):
    """benchmarks/explore_split_k.py's fused launch (rows of the hidden state from the down projection, then
    the q/k/v projection's split-K sums and the sum of squares by atomics) against the model's down launch
    and torch, under the interpreter (its --check-only: exit 1 when a sum is off)."""
    import explore_split_k as esk

    monkeypatch.setattr(sys, "argv", ["explore_split_k.py", "--check-only", "--rows", "8"])
    assert esk.main() == 0
