"""DreamBooth on every pipeline family the trainer knows (train/dreambooth/families.py), end to end, and the
``transformers`` target rule its --train_text_encoder uses."""

import pytest
import torch

import psoft_vision as pv
from psoft_vision.targets import select
from psoft_vision.targets.presets import preset_for
from psoft_vision.targets.structure import transformers_targets

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------ transformers targets
def tiny_clip(layers: int = 1, projection: bool = True):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=layers,
                            num_attention_heads=2, max_position_embeddings=8, projection_dim=8, bos_token_id=0,
                            eos_token_id=1, pad_token_id=1)
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(config)


def tiny_t5(layers: int = 2):
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=layers, num_heads=2))


def test_transformers_rule_adapts_the_linears_of_the_layer_stacks_and_nothing_else():
    clip = tiny_clip(layers=2)
    expected = [f"text_model.encoder.layers.{i}.{p}" for i in range(2) for p in
                ("self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj", "self_attn.out_proj", "mlp.fc1",
                 "mlp.fc2")]
    assert preset_for(clip) == "transformers"
    assert transformers_targets(clip) == expected == select(clip, "auto")  # never text_projection or embeddings
    one_layer = tiny_clip(layers=1, projection=False)  # a stack of one layer is a stack: CLIPEncoderLayer is declared
    names = [n for n, _ in one_layer.named_modules()]
    prefix = "text_model." if "text_model" in names else ""  # recent transformers drop this level in CLIPTextModel
    assert select(one_layer, "auto") == [prefix + n.removeprefix("text_model.") for n in expected if ".layers.0." in n]

    t5 = tiny_t5().eval()  # no dropout
    expected = [f"encoder.block.{i}.layer.{j}.{p}" for i in range(2) for j, ps in
                ((0, ("SelfAttention.q", "SelfAttention.k", "SelfAttention.v", "SelfAttention.o")),
                 (1, ("DenseReluDense.wi", "DenseReluDense.wo"))) for p in ps]
    assert select(t5, "auto") == expected  # not the shared embedding, relative_attention_bias or final norm

    pv.inject(t5, pv.PSOFTConfig(rank=2))
    ids = torch.tensor([[3, 4, 5, 1]])
    with torch.no_grad():
        before = t5(ids).last_hidden_state
        with pv.disabled(t5):
            assert torch.allclose(t5(ids).last_hidden_state, before, atol=1e-6)  # the identity at init
    assert {n for n, p in t5.named_parameters() if p.requires_grad} == {
        f"{layer}.adapters.default.{k}" for layer in expected for k in ("q", "alpha", "beta")}
