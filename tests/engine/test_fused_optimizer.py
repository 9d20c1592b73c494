"""The fused optimisers we build give the same parameters, bit for bit, as PyTorch's per-tensor loop."""

import dataclasses

import pytest
import torch

from mcibi.engine.optim import build_optimizer, load_optimizer_state
from mcibi.models import build_segmentor
from mcibi.spec.params import load_params

PARAMS = load_params("params/demo/upernet_mcibipp.yaml")


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_fused_optimizer_equals_the_loop(name):
    opt_params = dataclasses.replace(PARAMS.train.optimizer, name=name)
    torch.manual_seed(0)
    model = build_segmentor(PARAMS.model)
    fused = build_optimizer(model, opt_params)
    assert fused.defaults["fused"]
    reference_model = build_segmentor(PARAMS.model)
    reference_model.load_state_dict(model.state_dict())
    groups = [dict(g, params=[dict(reference_model.named_parameters())[n] for n in names])
              for g, names in zip(fused.param_groups, _group_names(model, fused), strict=True)]
    cls = torch.optim.SGD if name == "sgd" else torch.optim.AdamW
    reference = cls([{k: v for k, v in g.items() if k not in ("fused", "foreach")} for g in groups],
                    foreach=False, fused=False)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        for p, q in zip(model.parameters(), reference_model.parameters(), strict=True):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        fused.step()
        reference.step()
    for (n, p), q in zip(model.named_parameters(), reference_model.parameters(), strict=True):
        if name == "sgd":
            assert torch.equal(p, q), n
        else:  # AdamW: the fused kernel may round the bias-corrected step differently in the last bit
            assert torch.allclose(p, q, rtol=1e-5, atol=1e-7), (n, float((p - q).abs().max()))


def _group_names(model, optimizer):
    names = {id(p): n for n, p in model.named_parameters()}
    return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_state_saved_nchw_resumes_a_channels_last_model(name, tmp_path):
    """A checkpoint's optimiser state written under NCHW resumes a channels-last twin (another
    ``train.channels_last``, or ``auto`` on another machine) to the same next step: the fused kernels read the
    state with the parameter's strides, so the state is laid out like its parameter on load."""
    opt_params = dataclasses.replace(PARAMS.train.optimizer, name=name)
    torch.manual_seed(0)
    x = torch.randn(2, 8, 12, 12)

    def net():
        torch.manual_seed(1)
        return torch.nn.Sequential(torch.nn.Conv2d(8, 16, 3), torch.nn.ReLU(), torch.nn.Conv2d(16, 4, 3))

    def step(model, optimizer, layout):
        optimizer.zero_grad()
        model(x.contiguous(memory_format=layout)).square().mean().backward()
        optimizer.step()

    nchw = net()
    optimizer = build_optimizer(nchw, opt_params)
    step(nchw, optimizer, torch.contiguous_format)
    torch.save({"model": nchw.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "ckpt.pt")
    step(nchw, optimizer, torch.contiguous_format)  # the uninterrupted run

    saved = torch.load(tmp_path / "ckpt.pt")
    resumed = net()
    resumed.load_state_dict(saved["model"])
    resumed = resumed.to(memory_format=torch.channels_last)
    again = build_optimizer(resumed, opt_params)
    load_optimizer_state(again, saved["optimizer"])
    step(resumed, again, torch.channels_last)
    for p, q in zip(resumed.parameters(), nchw.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), float((p - q).abs().max())


def test_sgd_under_a_grad_scaler_survives_an_overflowing_first_step():
    """fp16 runs start with a large loss scale, so their first steps often overflow and are skipped. Fused SGD would
    keep the momentum buffers it allocated for such a step uninitialised and add them in the next step; the SGD
    built for fp16 is not fused and ends where the per-tensor loop does."""
    from mcibi.engine.step import build_optimizer as build_for_run

    fp16 = dataclasses.replace(PARAMS, train=dataclasses.replace(PARAMS.train, precision="fp16"))
    assert build_for_run(build_segmentor(PARAMS.model), PARAMS).defaults["fused"]
    x = torch.randn(2, 64, generator=torch.Generator().manual_seed(0))
    finals = []
    for make in (lambda m: build_for_run(m, fp16),
                 lambda m: torch.optim.SGD(m.parameters(), lr=PARAMS.train.optimizer.lr, momentum=0.9,
                                           weight_decay=PARAMS.train.optimizer.weight_decay, foreach=False)):
        torch.manual_seed(0)
        model = torch.nn.Linear(64, 64)
        optimizer = make(model)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for factor in (float("inf"), 1.0):  # an overflowing step (skipped), then a normal one
            optimizer.zero_grad()
            scaler.scale(model(x).sum() * factor).backward()
            scaler.step(optimizer)
            scaler.update()
        finals.append(model.weight.detach())
    assert torch.isfinite(finals[0]).all() and torch.equal(finals[0], finals[1])


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
def test_every_gradient_is_laid_out_like_its_parameter(layout):
    """The fused kernels walk a parameter and its gradient with the same strides (on CPU a mismatch is not an
    error, just a misaligned update): the training step leaves every gradient laid out like its parameter."""
    from mcibi.engine.step import train_step

    torch.manual_seed(0)
    model = build_segmentor(PARAMS.model).to(memory_format=layout)
    optimizer = build_optimizer(model, PARAMS.train.optimizer)
    mismatched, checked = {}, []

    def check(*_):
        checked.append(sum(p.grad is not None for p in model.parameters()))
        for name, p in model.named_parameters():
            dims = [d for d in range(p.dim()) if p.shape[d] > 1]  # strides of size-1 dims do not matter
            if p.grad is not None and any(p.stride(d) != p.grad.stride(d) for d in dims):
                mismatched[name] = (p.stride(), p.grad.stride())

    optimizer.register_step_pre_hook(check)
    x = torch.randn(2, 3, 64, 64).contiguous(memory_format=layout)
    train_step(model, x, torch.randint(0, 8, (2, 64, 64)), optimizer, 0.01, PARAMS, epoch=0)
    assert checked and checked[0] > 100 and not mismatched
