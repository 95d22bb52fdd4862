import copy

import pytest
import torch

adamw = pytest.importorskip("pretrain.kernels.adamw")


def make_params(seed):
    torch.manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(37, 48)), torch.nn.Parameter(torch.randn(80)),
            torch.nn.Parameter(torch.randn(3, 5, 7))]


def groups(params):
    return [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "weight_decay": 0.0}]


def test_five_steps_match_torch_adamw_params_and_state():
    ours_p, ref_p = make_params(0), make_params(0)
    kwargs = {"lr": 3e-3, "betas": (0.9, 0.95), "eps": 1e-8}
    ours = adamw.FusedAdamW(groups(ours_p), **kwargs)
    ref = torch.optim.AdamW(groups(ref_p), **kwargs)
    for step in range(5):
        torch.manual_seed(100 + step)
        grads = [torch.randn_like(p) for p in ours_p]
        for p, q, g in zip(ours_p, ref_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
        for key in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(ours.state[p][key], ref.state[q][key], atol=1e-7, rtol=1e-6)


def test_state_dict_is_interchangeable_with_torch():
    ours_p, ref_p = make_params(1), make_params(1)
    ref = torch.optim.AdamW(groups(ref_p), lr=1e-3)
    for p in ref_p:
        p.grad = torch.ones_like(p)
    ref.step()
    ours = adamw.FusedAdamW(groups(ours_p), lr=1e-3)
    ours.load_state_dict(copy.deepcopy(ref.state_dict()))  # torch -> ours, then one more step each
    for p, q in zip(ours_p, ref_p):
        p.data.copy_(q.data)
        p.grad, q.grad = torch.full_like(p, 0.5), torch.full_like(q, 0.5)
    ours.step()
    ref.step()
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
    back = torch.optim.AdamW(groups(make_params(1)), lr=1e-3)
    back.load_state_dict(copy.deepcopy(ours.state_dict()))  # ours -> torch
    torch.testing.assert_close(back.state_dict()["state"][0]["exp_avg"], ref.state_dict()["state"][0]["exp_avg"])


def test_master_weights_and_bad_inputs():
    p = torch.nn.Parameter(torch.randn(64).to(torch.bfloat16))
    with pytest.raises(TypeError, match="need master_weights=True"):
        p.grad = torch.ones_like(p)
        adamw.FusedAdamW([p]).step()
    opt = adamw.FusedAdamW([p], lr=1e-2, master_weights=True)
    assert opt.state[p].get("master_param") is None
    before_values = p.data.float().clone()
    opt.step()
    master = opt.state[p]["master_param"]
    assert master.dtype == torch.float32 and not torch.equal(master, before_values)
    # the bf16 parameter is the master rounded (the interpreter truncates instead: allow one bf16 step)
    assert ((p.data.float() - master).abs() <= master.abs() * 2 ** -7 + 1e-6).all()
    with pytest.raises(ValueError, match="invalid AdamW"):
        adamw.FusedAdamW([p], lr=-1)


def test_one_launch_per_group_whatever_the_tensor_count(monkeypatch):
    kernel, launches = adamw._adamw_multi_kernel, []

    class Counting:
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    monkeypatch.setattr(adamw, "_adamw_multi_kernel", Counting())
    params = [torch.nn.Parameter(torch.randn(n)) for n in (3, 2000, 17, 1025, 64)]
    for p in params:
        p.grad = torch.randn_like(p)
    adamw.FusedAdamW([{"params": params[:4]}, {"params": params[4:], "weight_decay": 0.0}]).step()
    assert len(launches) == 2  # one per parameter group
    assert launches[0] == (1 + 2 + 1 + 2,)  # blocks of 1024 over 3, 2000, 17, 1025 elements


def test_pointer_tables_are_built_once_while_storages_stay():
    """Gradients updated in place (what DDP / FSDP buckets do): one table build for many steps; a gradient that
    moves to a new storage rebuilds them, and the updates still equal torch's AdamW."""
    ours_p, ref_p = make_params(3), make_params(3)
    ours = adamw.FusedAdamW(ours_p, lr=1e-2, weight_decay=0.1)
    ref = torch.optim.AdamW(ref_p, lr=1e-2, weight_decay=0.1)
    for p, q in zip(ours_p, ref_p):
        p.grad, q.grad = torch.zeros_like(p), torch.zeros_like(q)
    for step in range(4):
        torch.manual_seed(step)
        for p, q in zip(ours_p, ref_p):
            g = torch.randn_like(p)
            p.grad.copy_(g)
            q.grad.copy_(g)
        ours.step()
        ref.step()
    assert ours.table_builds == 1
    kept = ours_p[0].grad
    ours_p[0].grad = kept.clone()  # a new storage for one gradient
    ref_p[0].grad = kept.clone()
    del kept
    ours.step()
    ref.step()
    assert ours.table_builds == 2
    for p, q in zip(ours_p, ref_p):
        torch.testing.assert_close(p, q, atol=1e-6, rtol=1e-6)
