"""The fused optimisers we build give the same parameters, bit for bit, as PyTorch's per-tensor loop."""

import dataclasses

import pytest
import torch

from mcibi.models import build_segmentor
from mcibi.optim import build_optimizer
from mcibi.params import load_params

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
