"""A small model shape, hardware and configs that the memory-plan tests share."""

from pipeline.config.loading import load_config
from pipeline.plan.hardware import GIB, Hardware
from pipeline.plan.model_shape import ModelShape
from tests.helpers import SMOKE

# 2 layers, width 64, 4 heads of 16 (2 kv heads), SwiGLU 128, vocabulary 300
SHAPE = ModelShape(num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, vocab_size=300, max_position_embeddings=128)
CPU = Hardware("cpu", 1, 24 * GIB)
# A 1.2B-parameter Llama: too big for the small devices below, big enough for knobs to matter.
BIG = ["model.num_hidden_layers=24", "model.hidden_size=2048", "model.intermediate_size=5632",
       "model.num_attention_heads=16"]


def smoke(*overrides):
    return load_config(SMOKE, list(overrides))


def gpus(count, gib, engine="ddp"):
    return Hardware("cuda", count, int(gib * GIB), engine)
