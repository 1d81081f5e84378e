"""PagedAdamW32bitOneSync: bitwise bitsandbytes' PagedAdamW32bit, with one launch per parameter group and one device
synchronization per step."""

from __future__ import annotations

import bitsandbytes as bnb
import pytest
import torch
from qlora_testing import requires_cuda

from qlora_lightning import optim
from qlora_lightning.optim import PagedAdamW32bitOneSync

DEVICES = ["cpu", pytest.param("cuda", marks=requires_cuda)]
#: Large enough that a step moves nearly every bf16 weight (at the paper's 2e-4 only ~5 % of values of size ~1 change,
#: and "bitwise equal" would mostly compare untouched values).
LR = 1e-2


def _adapters(device: str, seed: int = 0) -> list[torch.nn.Parameter]:
    """bf16 tensors shaped like a layer's LoRA A and B (r 8), and one left without a gradient."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(8, 64), (64, 8), (8, 128), (64, 8), (8, 64)]
    return [torch.nn.Parameter(torch.randn(s, generator=g).to(device, torch.bfloat16)) for s in shapes]


def _steps(optimizer_class, device: str, steps: int = 3):
    params = _adapters(device)
    optimizer = optimizer_class(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    g = torch.Generator().manual_seed(1)
    for _ in range(steps):
        for p in params[:-1]:  # the last one gets no gradient and must be skipped
            p.grad = torch.randn(p.shape, generator=g).to(device, p.dtype)
        optimizer.step()
        optimizer.zero_grad()
    return params, optimizer


@pytest.mark.parametrize("device", DEVICES)
def test_the_updates_are_bitwise_bitsandbytes(device):
    theirs, their_optimizer = _steps(bnb.optim.PagedAdamW32bit, device)
    ours, our_optimizer = _steps(PagedAdamW32bitOneSync, device)
    for a, b in zip(theirs, ours, strict=True):
        assert torch.equal(a, b)
    moved = [(p != p0.to(device)).float().mean() for p, p0 in zip(ours, _adapters("cpu"), strict=True)]
    assert all(m > 0.9 for m in moved[:-1]) and moved[-1] == 0  # the updates compared, and none without a gradient
    for a, b in zip(theirs[:-1], ours[:-1], strict=True):
        mine, bnb_state = our_optimizer.state[b], their_optimizer.state[a]
        assert mine["step"] == bnb_state["step"] == 3
        assert torch.equal(mine["state1"], bnb_state["state1"]) and torch.equal(mine["state2"], bnb_state["state2"])
    assert not our_optimizer.state[ours[-1]]  # no gradient, no state


def _launches(monkeypatch) -> list[int]:
    """The element count of every bitsandbytes 32-bit update launched from now on (ours and bitsandbytes' own)."""
    counts: list[int] = []
    real = bnb.functional.optimizer_update_32bit
    monkeypatch.setattr(
        bnb.functional,
        "optimizer_update_32bit",
        lambda name, g, *a, **k: (counts.append(g.numel()), real(name, g, *a, **k)),
    )
    return counts


@pytest.mark.parametrize("device", DEVICES)
def test_one_launch_updates_every_parameter_of_a_group(device, monkeypatch):
    counts = _launches(monkeypatch)
    _steps(bnb.optim.PagedAdamW32bit, device, steps=1)
    assert counts == [512, 512, 1024, 512]  # bitsandbytes: one per parameter with a gradient
    counts.clear()
    params, optimizer = _steps(PagedAdamW32bitOneSync, device, steps=2)
    assert counts == [2560, 2560]  # ours: one per step for all four
    state1 = [optimizer.state[p]["state1"] for p in params[:-1]]
    assert len({s.untyped_storage().data_ptr() for s in state1}) == 1  # views of one buffer
    assert all(s.shape == p.shape for s, p in zip(state1, params[:-1], strict=True))


def test_a_group_larger_than_one_launch_is_updated_in_parts_bitwise_the_same(monkeypatch):
    counts = _launches(monkeypatch)
    monkeypatch.setattr(optim, "LAUNCH_ELEMENTS", 1000)
    theirs, _ = _steps(bnb.optim.PagedAdamW32bit, "cpu")
    counts.clear()
    ours, _ = _steps(PagedAdamW32bitOneSync, "cpu")
    assert counts == [1000, 1000, 560] * 3
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))


@pytest.mark.parametrize("device", DEVICES)
def test_a_parameter_without_a_gradient_at_one_step_is_updated_as_bitsandbytes_updates_it(device, monkeypatch):
    """Parameter 0 gets no gradient at the second of four steps: that step updates the other three in one launch
    (over new flat states); after it the step counts differ, and the group is updated one parameter at a time."""
    counts = _launches(monkeypatch)

    def run(optimizer_class):
        params = _adapters(device)
        optimizer = optimizer_class(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
        g = torch.Generator().manual_seed(1)
        for step in range(4):
            for i, p in enumerate(params[:-1]):
                grad = torch.randn(p.shape, generator=g).to(device, p.dtype)
                p.grad = None if (step == 1 and i == 0) else grad
            optimizer.step()
            optimizer.zero_grad()
        return params, optimizer

    theirs, their_optimizer = run(bnb.optim.PagedAdamW32bit)
    counts.clear()
    ours, our_optimizer = run(PagedAdamW32bitOneSync)
    assert counts == [2560, 2048, 512, 512, 1024, 512, 512, 512, 1024, 512]  # one launch while the counts agree
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))
    for a, b in zip(theirs[:-1], ours[:-1], strict=True):
        assert our_optimizer.state[b]["step"] == their_optimizer.state[a]["step"]
        assert torch.equal(our_optimizer.state[b]["state1"], their_optimizer.state[a]["state1"])
        assert torch.equal(our_optimizer.state[b]["state2"], their_optimizer.state[a]["state2"])


def _third_step(params, optimizer) -> None:
    """The third step of `_steps`, with the gradients it draws for that step, on an optimizer that made two."""
    g = torch.Generator().manual_seed(1)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g).to(p.device, p.dtype) for p in params[:-1]]
    for p, grad in zip(params[:-1], grads, strict=True):
        p.grad = grad
    optimizer.step()


@pytest.mark.parametrize(
    "first, second",
    [(bnb.optim.PagedAdamW32bit, PagedAdamW32bitOneSync), (PagedAdamW32bitOneSync, bnb.optim.PagedAdamW32bit)],
    ids=["bitsandbytes-to-ours", "ours-to-bitsandbytes"],
)
def test_a_checkpoint_of_either_loads_into_the_other(first, second):
    """Two steps by one, its state dict loaded into the other, a third step there: the parameters and states are
    bitwise those of three uninterrupted steps."""
    straight, straight_optimizer = _steps(first, "cpu", steps=3)
    params, saved = _steps(first, "cpu", steps=2)
    resumed = second(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    resumed.load_state_dict(saved.state_dict())
    _third_step(params, resumed)
    assert all(torch.equal(a, b) for a, b in zip(straight, params, strict=True))
    for a, b in zip(straight[:-1], params[:-1], strict=True):
        want, got = straight_optimizer.state[a], resumed.state[b]
        assert got["step"] == want["step"] == 3
        assert torch.equal(got["state1"], want["state1"]) and torch.equal(got["state2"], want["state2"])


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_update_is_adamws(weight_decay):
    """Three steps on fp32 parameters agree with `torch.optim.AdamW` on a copy (decoupled weight decay, bias
    correction): bitsandbytes' kernel being bitwise ours (above) says nothing of whether both compute AdamW."""
    g = torch.Generator().manual_seed(0)
    ours = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(8, 64), (64, 8)]]
    reference = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    settings = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay)
    optimizers = [PagedAdamW32bitOneSync(ours, **settings), torch.optim.AdamW(reference, **settings)]
    start = [p.detach().clone() for p in ours]
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=g) for p in ours]
        for group, optimizer in zip((ours, reference), optimizers, strict=True):
            for p, grad in zip(group, grads, strict=True):
                p.grad = grad.clone()
            optimizer.step()
    for p, want, p0 in zip(ours, reference, start, strict=True):
        assert (p - p0).abs().min() > 0  # every weight moved (lr 1e-2: ~3e-2 in three steps)
        torch.testing.assert_close(p.detach(), want.detach(), rtol=0, atol=1e-6)


@requires_cuda
def test_one_synchronization_per_step_on_the_gpu(monkeypatch):
    calls = []
    real = torch.cuda.synchronize
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a, **k: (calls.append(1), real(*a, **k)))
    counts = {}
    for optimizer_class in (bnb.optim.PagedAdamW32bit, PagedAdamW32bitOneSync):
        params, optimizer = _steps(optimizer_class, "cuda", steps=1)  # the first step allocates the paged states
        for p in params[:-1]:
            p.grad = torch.ones_like(p)
        calls.clear()
        optimizer.step()
        counts[optimizer_class.__name__] = len(calls)
    # bitsandbytes 0.50 waits after each of the 4 updates and once more
    assert counts == {"PagedAdamW32bit": 5, "PagedAdamW32bitOneSync": 1}


def test_a_config_selects_it_with_its_own_and_bitsandbytes_arguments(tmp_path):
    from qlora_testing import REPO

    from qlora_lightning.cli import run_lightning_cli

    cli = run_lightning_cli(
        [
            "--config",
            str(REPO / "configs" / "70b.yaml"),
            "--trainer.default_root_dir",
            str(tmp_path),
            "--model.optimizer",
            "qlora_lightning.optim.PagedAdamW32bitOneSync",
            "--model.optimizer.lr",
            "1e-4",
            "--model.optimizer.weight_decay",
            "0.0",
            "--model.optimizer.states_on_host",
            "true",
        ],
        run=False,
    )
    optimizer = cli.model.optimizer_factory([torch.nn.Parameter(torch.zeros(4))])
    assert isinstance(optimizer, PagedAdamW32bitOneSync) and optimizer.states_on_host
    assert optimizer.defaults["lr"] == 1e-4 and optimizer.defaults["weight_decay"] == 0.0
    assert optimizer.defaults["betas"] == (0.9, 0.999)  # bitsandbytes' default, passed through


@pytest.mark.parametrize("device", DEVICES)
def test_states_on_host_changes_no_update(device):
    theirs, _ = _steps(bnb.optim.PagedAdamW32bit, device)
    ours, _ = _steps(lambda params, **kw: PagedAdamW32bitOneSync(params, states_on_host=True, **kw), device)
    assert all(torch.equal(a, b) for a, b in zip(theirs, ours, strict=True))


@requires_cuda
@pytest.mark.parametrize("states_on_host", [False, True])
def test_states_on_host_leave_the_card_between_steps(states_on_host):
    """Two 64 M-element adapters: 1 GiB of 32-bit states. Paging leaves them on the card after a step; with
    `states_on_host` they are in pinned host memory and the card's free memory after the step is what it was
    before they existed."""
    params = [torch.nn.Parameter(torch.zeros(2**26, device="cuda", dtype=torch.bfloat16)) for _ in range(2)]
    for p in params:
        p.grad = torch.full_like(p, 1e-3)
    optimizer = PagedAdamW32bitOneSync(params, lr=1e-4, states_on_host=states_on_host)
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    free_before = torch.cuda.mem_get_info()[0]
    for _ in range(2):
        optimizer.step()
    torch.cuda.empty_cache()  # the per-parameter copies' blocks go back to the card
    taken = free_before - torch.cuda.mem_get_info()[0]
    states = [optimizer.state[p][k] for p in params for k in ("state1", "state2")]
    if states_on_host:
        assert all(s.device.type == "cpu" and s.is_pinned() for s in states)
        assert taken < 2**27, f"{taken / 2**20:.0f} MiB of the card still taken after the step"
    else:
        assert all(getattr(s, "is_paged", False) for s in states)
        assert taken > 2**29, f"only {taken / 2**20:.0f} MiB taken: paging no longer keeps the states on the card"
    assert torch.equal(params[0], params[1]) and float(params[0][0]) < 0  # the updates happened


@requires_cuda
def test_host_states_resume_from_a_checkpoint_as_an_uninterrupted_run():
    """A state dict saved by an optimizer with host states and loaded into a new one (whose states then arrive on
    the parameter's device) goes on exactly as the run that was not interrupted, with its states back on the host."""

    def host_adamw(params, **kw):
        return PagedAdamW32bitOneSync(params, states_on_host=True, **kw)

    straight, _ = _steps(host_adamw, "cuda", steps=3)
    params, first = _steps(host_adamw, "cuda", steps=2)
    saved = first.state_dict()
    resumed = host_adamw(params, lr=LR, betas=(0.9, 0.999), weight_decay=0.0)
    resumed.load_state_dict(saved)
    _third_step(params, resumed)
    assert all(torch.equal(a, b) for a, b in zip(straight, params, strict=True))
    assert all(resumed.state[p]["state1"].device.type == "cpu" for p in params[:-1])


@pytest.mark.parametrize("device", DEVICES)
def test_a_state_dict_saved_and_loaded_goes_into_flat_states_and_on_bitwise(device):
    """Adapters large enough to be paged on a GPU (64 × 4096 twice): three straight steps against two, the state dict
    through torch.save and a weights-only load (as a checkpoint goes) into a new optimizer, and the third. The loaded
    states, which arrive as plain tensors on the parameters' device, are copied into new flat (on a GPU: paged)
    buffers."""
    import io

    def run(steps: range, params, state=None):
        optimizer = PagedAdamW32bitOneSync(params, lr=LR)
        if state is not None:
            optimizer.load_state_dict(state)
        g = torch.Generator().manual_seed(1)
        for i in range(3):
            grads = [torch.randn(p.shape, generator=g).to(device, p.dtype) for p in params]
            if i in steps:
                for p, grad in zip(params, grads, strict=True):
                    p.grad = grad
                optimizer.step()
        return optimizer

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=g).to(device, torch.bfloat16) for s in [(64, 4096), (4096, 64)]]
    straight = [torch.nn.Parameter(t.clone()) for t in start]
    straight_optimizer = run(range(3), straight)
    params = [torch.nn.Parameter(t.clone()) for t in start]
    first = run(range(2), params)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    resumed = run(range(2, 3), params, torch.load(buffer, weights_only=True))
    assert all(torch.equal(a, b) for a, b in zip(straight, params, strict=True))
    assert not torch.equal(params[0], start[0])
    for a, b in zip(straight, params, strict=True):
        want, got = straight_optimizer.state[a], resumed.state[b]
        assert got["step"] == want["step"] == 3
        assert torch.equal(got["state1"], want["state1"]) and torch.equal(got["state2"], want["state2"])
        assert getattr(got["state1"], "is_paged", False) == (device == "cuda")


@pytest.mark.parametrize("device", DEVICES)
def test_a_check_before_the_update_runs_after_the_closure_and_a_failing_one_changes_nothing(device):
    """`check_before_update`, registered inside the closure as `callbacks.NonFiniteGuard` registers it from
    Lightning's: it runs once, after the closure; raising, it leaves the parameters, the states and the step count as
    they were, and the next step is the one an optimizer that never saw the failed one takes."""
    params, optimizer = _steps(PagedAdamW32bitOneSync, device, steps=1)
    reference, reference_optimizer = _steps(PagedAdamW32bitOneSync, device, steps=1)
    order: list[str] = []

    def closure(fail: bool) -> None:
        order.append("closure")
        for p in params[:-1]:
            p.grad = torch.ones_like(p)

        def check() -> None:
            order.append("check")
            if fail:
                raise FloatingPointError("not finite")

        optimizer.check_before_update(check)

    before = [p.detach().clone() for p in params]
    states = [{k: v.clone() if torch.is_tensor(v) else v for k, v in optimizer.state[p].items()} for p in params[:-1]]
    with pytest.raises(FloatingPointError, match="not finite"):
        optimizer.step(lambda: closure(fail=True))
    assert order == ["closure", "check"]
    assert all(torch.equal(a, p) for a, p in zip(before, params, strict=True))
    for p, saved in zip(params[:-1], states, strict=True):
        assert optimizer.state[p].keys() == saved.keys()
        assert all(
            torch.equal(v, saved[k]) if torch.is_tensor(v) else v == saved[k] for k, v in optimizer.state[p].items()
        )

    optimizer.step(lambda: closure(fail=False))  # the failed step's check does not run again
    assert order == ["closure", "check", "closure", "check"]
    for p in reference[:-1]:
        p.grad = torch.ones_like(p)
    reference_optimizer.step()
    assert all(torch.equal(a, b) for a, b in zip(params, reference, strict=True))
    assert optimizer.state[params[0]]["step"] == reference_optimizer.state[reference[0]]["step"] == 2
