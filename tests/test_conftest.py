"""The shared fixtures keep torch.device("meta") working (parameter counts of large shapes need it)."""

import torch

from ssmtune.models import MambaConfig, MambaForCausalLM


def test_meta_device_construction_is_not_defeated():
    with torch.device("meta"):
        m = MambaForCausalLM(MambaConfig(d_model=64, n_layer=2, vocab_size=256), init=False)
    assert {p.device.type for p in m.parameters()} == {"meta"}
