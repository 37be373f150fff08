"""The tiny Llama configuration and the exact FlexPrefill setting the transformers tests share."""

from flexprefill import FlexPrefillConfig

# gamma 1 and no budget floor: FlexPrefill keeps every causal block, so outputs equal eager/SDPA
EXACT = FlexPrefillConfig(block_size=32, min_seq_len=0, gamma=1.0, min_budget=0)
COMMON = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    vocab_size=128,
    max_position_embeddings=1024,
)
