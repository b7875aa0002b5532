"""Attention's packed input projections (q, k, v, indexer q and k as views of one buffer, one GEMM at inference)."""

import pytest
import torch

import test_model_modules
from conftest import rel_err
from keye.model import KeyeVL, load_checkpoint, save_checkpoint, tiny_config
from keye.model.attention import _packed_weight


one_thread = test_model_modules.one_thread  # shared autouse fixture


def pair():
    torch.manual_seed(0)
    a = KeyeVL(tiny_config()).eval()
    b = KeyeVL(tiny_config()).eval()
    b.load_state_dict(a.state_dict())
    return a, b.pack_input_projections()


def packed(model):
    return [_packed_weight(layer.self_attn.input_projections()) for layer in model.model.layers]


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_packed_model_computes_the_same_logits(mode):
    plain, pk = pair()
    assert all(p is not None for p in packed(pk)) and all(p is None for p in packed(plain))
    for name, t in plain.state_dict().items():
        assert torch.equal(pk.state_dict()[name], t), name
    ids = torch.randint(0, 240, (40,))
    with torch.no_grad():
        assert rel_err(pk(ids, attention_mode=mode), plain(ids, attention_mode=mode)) < 1e-5
    # the packed GEMM really runs: corrupting the buffer through one view changes the output
    with torch.no_grad():
        pk.model.layers[0].self_attn.v_proj.weight.mul_(3)
        assert rel_err(pk(ids, attention_mode=mode), plain(ids, attention_mode=mode)) > 1e-3


def test_in_place_loads_reach_the_packed_buffer_and_replacements_fall_back():
    plain, pk = pair()
    torch.manual_seed(1)
    other = KeyeVL(tiny_config()).eval()
    pk.load_state_dict(other.state_dict())  # copy_ into the views
    assert all(p is not None for p in packed(pk))
    ids = torch.randint(0, 240, (30,))
    with torch.no_grad():
        assert rel_err(pk(ids), other(ids)) < 1e-5
        pk.model.layers[1].self_attn.k_proj.weight = torch.nn.Parameter(other.model.layers[1].self_attn.k_proj.weight
                                                                       .clone())
        assert packed(pk)[1] is None and packed(pk)[0] is not None
        assert rel_err(pk(ids), other(ids)) < 1e-5
        half = pk.bfloat16()  # .to() gives every parameter its own storage: the per-linear path, still correct
        assert all(p is None for p in packed(half))
        assert torch.equal(half(ids), other.bfloat16()(ids))


def test_packing_keeps_the_parameter_objects_an_optimizer_holds():
    plain, _ = pair()
    model = KeyeVL(tiny_config()).eval()
    model.load_state_dict(plain.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {name: p for name, p in model.named_parameters()}
    model.pack_input_projections()  # as generate() does between training steps, e.g. in RL
    assert all(p is before[name] for name, p in model.named_parameters())
    assert all(p is not None for p in packed(model))
    model.train()
    model(torch.randint(0, 240, (12,)), attention_mode="sparse").float().square().mean().backward()
    opt.step()  # updates in place, through the views: the packed buffer sees the step
    assert all(p is not None for p in packed(model))
    v = model.model.layers[0].self_attn.v_proj.weight
    assert not torch.equal(v, plain.model.layers[0].self_attn.v_proj.weight)
    with torch.no_grad():
        model.eval()
        unpacked = KeyeVL(tiny_config()).eval()
        unpacked.load_state_dict(model.state_dict())
        ids = torch.randint(0, 240, (25,))
        assert rel_err(model(ids), unpacked(ids)) < 1e-5


def test_training_gets_a_gradient_for_q_k_v():
    _, pk = pair()
    pk.train()
    loss = pk(torch.randint(0, 240, (20,)), attention_mode="sparse").float().square().mean()
    loss.backward()
    for layer in pk.model.layers:
        for lin in layer.self_attn.input_projections()[:3]:  # (the indexer learns from its own losses, not this one)
            assert lin.weight.grad is not None and lin.weight.grad.abs().sum() > 0


def test_packed_model_saves_and_loads_packed(tmp_path):
    plain, pk = pair()
    save_checkpoint(pk, str(tmp_path))  # views of one buffer: saved as separate tensors
    loaded = load_checkpoint(str(tmp_path), dtype=torch.float32)
    assert all(p is not None for p in packed(loaded))
    for name, t in plain.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], t), name
