"""Tiny Hugging Face configs of each supported family, shared by the tests.

One per feature the model, the loader and the checkpoints must carry: MHA and GQA, tied and
untied embeddings, Llama 3 rope scaling, biases on q/k/v (Qwen2), q/k norms (Qwen3).
"""

HF_BASE = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=16,
    max_position_embeddings=256,
)
HF_CONFIGS = {
    "llama_mha_tied": dict(
        HF_BASE, model_type="llama", num_key_value_heads=4, tie_word_embeddings=True
    ),
    "llama_gqa_untied": dict(
        HF_BASE, model_type="llama", num_key_value_heads=2, tie_word_embeddings=False
    ),
    "llama_gqa_llama3_rope": dict(
        HF_BASE,
        model_type="llama",
        num_key_value_heads=2,
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
    ),
    "mistral_gqa": dict(
        HF_BASE,
        model_type="mistral",
        num_key_value_heads=1,
        tie_word_embeddings=False,
        sliding_window=None,
    ),
    "qwen2_bias": dict(
        HF_BASE, model_type="qwen2", num_key_value_heads=2, tie_word_embeddings=False
    ),
    "qwen3_qknorm": dict(
        HF_BASE, model_type="qwen3", num_key_value_heads=2, tie_word_embeddings=False
    ),
}
