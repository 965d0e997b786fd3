"""Issue 10 defect 11: resharding ZeroPartitioned state keeps each parameter with its
optimizer state, and every share is a state_dict a real torch.optim.AdamW loads."""

from __future__ import annotations

from pathlib import Path

import pytest

import arrayckpt as ac

torch = pytest.importorskip("torch", reason="the test drives a real torch.optim.AdamW")

NAMES = [f"layer{i}.weight" for i in range(7)]


def trained(names: list[str]) -> tuple[dict[str, torch.Tensor], dict[str, object]]:
    """Parameters ``names`` and the state_dict of an AdamW over exactly them, after 2 steps."""
    gen = torch.Generator().manual_seed(sum(map(ord, "".join(names))))
    params = [torch.nn.Parameter(torch.randn(3 + i, 4, generator=gen)) for i, _ in enumerate(names)]
    opt = torch.optim.AdamW(params, lr=0.01, weight_decay=0.1)
    for _ in range(2):
        sum((p * p).sum() for p in params).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach() for n, p in zip(names, params, strict=True)}, opt.state_dict()


def save_zero(directory: Path, n: int) -> dict[str, dict[str, torch.Tensor]]:
    """Each of ``n`` ranks saves its parameters and its optimizer's state_dict; returns each
    parameter's tensors (itself, exp_avg, exp_avg_sq, step) by name."""
    truth: dict[str, dict[str, torch.Tensor]] = {}
    for r in range(n):
        mine = NAMES[r::n]
        model, opt = trained(mine)
        state = opt["state"]
        assert isinstance(state, dict)
        for i, name in enumerate(mine):
            truth[name] = {"param": model[name], **state[i]}
        ac.save_distributed_checkpoint(
            directory,
            r,
            n,
            model,
            opt,
            ac.TrainingState(2),
            ac.ShardingConfig(ac.ZeroPartitioned(3)),
            coordinator=None,
        )
    return truth


@pytest.mark.parametrize(("n", "m"), [(2, 4), (2, 3), (3, 2), (2, 1)])
def test_reshard_keeps_state_with_its_parameter_and_loads_into_adamw(
    tmp_path: Path, n: int, m: int
) -> None:
    truth = save_zero(tmp_path / "z", n)
    seen: list[str] = []
    for r in range(m):
        share = ac.load_distributed_checkpoint(tmp_path / "z", r, world_size=m, xp="torch")
        names = list(share.model)
        seen += names
        opt_state = share.optimizer
        assert isinstance(opt_state, dict) and set(opt_state) == {"state", "param_groups"}
        assert [g["params"] for g in opt_state["param_groups"]] == [list(range(len(names)))]
        params = [torch.nn.Parameter(share.model[k].clone()) for k in names]
        opt = torch.optim.AdamW(params, lr=0.5)
        opt.load_state_dict(opt_state)  # the share is loadable by its optimizer
        assert opt.param_groups[0]["lr"] == 0.01  # the saved settings came with it
        for p, name in zip(params, names, strict=True):
            want = truth[name]
            torch.testing.assert_close(p.detach(), want["param"], rtol=0, atol=0)
            got = opt.state[p]
            assert set(got) == {"step", "exp_avg", "exp_avg_sq"}
            for k in ("step", "exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(got[k], want[k], rtol=0, atol=0)
        if params:
            sum((p * p).sum() for p in params).backward()
            opt.step()  # and it trains on
    assert sorted(seen) == sorted(NAMES)  # each parameter on exactly one new rank
