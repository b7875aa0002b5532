"""KeyeVL.pack_experts: gate_up in keye.ops.moe_pack_gate_up's column order for inference, with the state_dict and
checkpoints still in the released order, and a clear error where gradients are wanted (CPU, tiny model)."""

import pytest
import torch

from keye.model import KeyeVL, load_checkpoint, save_checkpoint, tiny_config

import test_model_modules

one_thread = test_model_modules.one_thread  # shared autouse fixture


def packable_model():
    torch.manual_seed(0)
    return KeyeVL(tiny_config(moe_intermediate_size=128)).eval()  # 2I a multiple of 256


def test_packed_experts_compute_the_same_model():
    m = packable_model()
    ids = torch.randint(0, 240, (12,))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    w = m.model.layers[0].mlp.experts.gate_up_proj
    original = w.detach().clone()
    with torch.no_grad():
        want = m(ids)
        assert m.pack_experts() is m and m.pack_experts() is m  # idempotent
        assert m.model.layers[0].mlp.experts.gate_up_proj is w  # the same Parameter, reordered in place
        assert not torch.equal(w.detach(), original)
        assert torch.equal(m(ids), want)  # the CPU path unpacks: the same arithmetic
    after = m.state_dict()
    assert after.keys() == before.keys()
    for k in before:
        assert torch.equal(after[k], before[k]), k  # the state_dict keeps the checkpoint's order
    m.unpack_experts().unpack_experts()
    assert torch.equal(w.detach(), original)


def test_packed_experts_refuse_gradients_with_the_way_out():
    m = packable_model().pack_experts()
    with pytest.raises(ValueError, match=r"gate_up_packed=True is for inference.*KeyeVL.unpack_experts\(\)"):
        m(torch.randint(0, 240, (5,)))
    m.unpack_experts()
    m(torch.randint(0, 240, (5,))).sum().backward()
    assert m.model.layers[0].mlp.experts.gate_up_proj.grad is not None


@pytest.mark.parametrize("layout", ["fused", "per_expert"])
def test_packed_model_saves_and_loads_the_checkpoint_order(tmp_path, layout):
    ref = packable_model()
    m = packable_model().pack_experts()
    save_checkpoint(m, str(tmp_path), expert_layout=layout)
    back = load_checkpoint(str(tmp_path), dtype=torch.float32)
    a, b = dict(ref.named_parameters()), dict(back.named_parameters())
    for n in a:
        assert torch.equal(a[n], b[n]), n
    # a checkpoint-order state_dict loaded into packed experts is packed on the way in
    target = KeyeVL(tiny_config(moe_intermediate_size=128)).eval().pack_experts()
    target.load_state_dict(ref.state_dict())
    ids = torch.randint(0, 240, (9,))
    with torch.no_grad():
        assert torch.equal(target(ids), ref(ids))
    assert torch.equal(target.unpack_experts().model.layers[1].mlp.experts.gate_up_proj,
                       ref.model.layers[1].mlp.experts.gate_up_proj)


def test_pack_needs_a_packable_intermediate_size():
    with pytest.raises(ValueError, match=r"moe_pack_gate_up: argument 'gate_up' must have 2I a multiple of 256"):
        KeyeVL(tiny_config()).pack_experts()  # I = 24
