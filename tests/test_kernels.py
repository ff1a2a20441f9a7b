"""The sparse kernels: C equals torch, and bad input never crashes the interpreter."""

from __future__ import annotations

import pytest
import torch

from ablation import kernels, sae


def test_compiled_kernels_equal_the_torch_path(monkeypatch):
    if kernels.kernel_backend() != "C":
        pytest.skip("no C compiler: the torch path is the only one")
    gen = torch.Generator().manual_seed(0)
    pre = torch.randn(300, 96, generator=gen)
    idx = torch.randint(0, 50, (300, 6), generator=gen)
    w, w2 = torch.rand(300, 6, generator=gen), torch.randn(300, 6, generator=gen)
    rows, rows2, table = (torch.randn(300, 24, generator=gen), torch.randn(300, 24, generator=gen),
                          torch.randn(50, 24, generator=gen))
    mat = torch.rand(40, 30, generator=gen) - 0.3
    c = (kernels.topk_rows(pre, 7), kernels.gather_sum(idx, w, table), kernels.gather_dot(idx, rows, table),
         kernels.scatter_sum2(idx, 50, w, rows, w2, rows2))
    c_mat = mat.clone()
    sae.project_archetypal_(c_mat, torch.zeros(40, 3), 1.0)
    monkeypatch.setattr(kernels, "_use_c", lambda *t, **kw: False)
    t = (kernels.topk_rows(pre, 7), kernels.gather_sum(idx, w, table), kernels.gather_dot(idx, rows, table),
         kernels.scatter_sum2(idx, 50, w, rows, w2, rows2))
    t_mat = mat.clone()
    sae.project_archetypal_(t_mat, torch.zeros(40, 3), 1.0)
    assert torch.equal(c[0][1], t[0][1]) and torch.equal(c[0][0], t[0][0])  # same set, same order
    assert torch.equal(c[0][1], pre.topk(7, -1).indices.sort(-1).values)
    for a, b in ((c[1], t[1]), (c[2], t[2]), *zip(c[3], t[3]), (c_mat, t_mat)):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    assert torch.allclose(c_mat.sum(-1), torch.ones(40)) and (c_mat >= 0).all()


def _args(gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """idx (12 x 3, into 20 rows), weights and a 20 x 8 table, as the trainer passes them."""
    return (torch.randint(0, 20, (12, 3), generator=gen), torch.rand(12, 3, generator=gen),
            torch.randn(20, 8, generator=gen))


def test_int32_indices_take_the_torch_path_and_give_the_same_sums():
    idx, w, table = _args(torch.Generator().manual_seed(1))
    assert torch.allclose(kernels.gather_sum(idx.int(), w, table), kernels.gather_sum(idx, w, table),
                          atol=1e-6)
    assert torch.allclose(kernels.gather_dot(idx.int(), table[:12], table),
                          kernels.gather_dot(idx, table[:12], table), atol=1e-6)
    a, b = kernels.scatter_sum2(idx.int(), 20, w, table[:12], w, table[:12])
    assert torch.allclose(a, kernels.scatter_sum2(idx, 20, w, table[:12], w, table[:12])[0], atol=1e-6)


def test_float64_inputs_give_float64_results():
    idx, w, table = _args(torch.Generator().manual_seed(2))
    out = kernels.gather_sum(idx, w.double(), table.double())
    assert out.dtype == torch.float64
    assert torch.allclose(out.float(), kernels.gather_sum(idx, w, table), atol=1e-5)
    vals, top = kernels.topk_rows(table.double(), 3)
    assert vals.dtype == torch.float64 and torch.equal(top, kernels.topk_rows(table, 3)[1])


def test_non_contiguous_inputs_equal_their_contiguous_copies():
    idx, w, table = _args(torch.Generator().manual_seed(3))
    wide = torch.randn(8, 20)  # its transpose is a non-contiguous 20 x 8 table
    assert not wide.T.is_contiguous()
    assert torch.allclose(kernels.gather_sum(idx, w, wide.T), kernels.gather_sum(idx, w, wide.T.contiguous()),
                          atol=1e-6)
    assert torch.equal(kernels.topk_rows(wide.T, 2)[1], kernels.topk_rows(wide.T.contiguous(), 2)[1])


def test_bad_arguments_raise_clear_errors_instead_of_crashing():
    idx, w, table = _args(torch.Generator().manual_seed(4))
    with pytest.raises(TypeError, match="idx must be an int64 or int32 tensor"):
        kernels.gather_sum(idx.float(), w, table)
    with pytest.raises(TypeError, match="share one dtype"):
        kernels.gather_sum(idx, w.double(), table)
    with pytest.raises(ValueError, match="w .* must match idx"):
        kernels.gather_sum(idx, w[:, :2], table)
    with pytest.raises(IndexError, match="outside 0..19"):
        kernels.gather_sum(torch.full((12, 3), 20), w, table)  # past the table: no read out of bounds
    with pytest.raises(IndexError, match="outside 0..19"):
        kernels.scatter_sum2(torch.full((12, 3), -1), 20, w, table[:12], w, table[:12])
    with pytest.raises(ValueError, match="k=9 must lie in 1..8"):
        kernels.topk_rows(table, 9)
    with pytest.raises(ValueError, match="one device"):
        kernels.gather_sum(idx, w, table.to("meta"))


def test_inputs_off_the_cpu_never_reach_the_c_kernels():
    """A tensor on another device (the meta device stands in for CUDA here) takes torch's path."""
    idx, w, table = _args(torch.Generator().manual_seed(5))
    out = kernels.gather_sum(idx.to("meta"), w.to("meta"), table.to("meta"))
    assert out.device.type == "meta" and out.shape == (12, 8)
    vals, top = kernels.topk_rows(table.to("meta"), 3)
    assert vals.device.type == "meta" and top.shape == (20, 3)


def test_bfloat16_rows_give_the_float32_selection():
    gen = torch.Generator().manual_seed(3)
    pre = torch.stack([torch.randperm(256, generator=gen) for _ in range(40)]).float() - 100.0
    vals, idx = kernels.topk_rows(pre.bfloat16(), 16)  # integers below 256 are exact in bf16
    assert vals.dtype == torch.float32
    assert torch.equal(idx, kernels.topk_rows(pre, 16)[1])
    assert torch.equal(idx, pre.topk(16, -1).indices.sort(-1).values)
    assert torch.equal(vals, pre.gather(1, idx))
