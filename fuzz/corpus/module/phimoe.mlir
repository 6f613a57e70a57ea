module {
  moe.model @model family "phimoe" hidden 32 sources ["model.safetensors"] config "{\22architectures\22:[\22PhimoeForCausalLM\22],\22attention_bias\22:true,\22attention_dropout\22:0.0,\22bos_token_id\22:1,\22dtype\22:\22bfloat16\22,\22eos_token_id\22:2,\22hidden_act\22:\22silu\22,\22hidden_size\22:32,\22initializer_range\22:0.2,\22input_jitter_noise\22:0.0,\22intermediate_size\22:24,\22lm_head_bias\22:true,\22max_position_embeddings\22:256,\22model_type\22:\22phimoe\22,\22num_attention_heads\22:4,\22num_experts_per_tok\22:2,\22num_hidden_layers\22:2,\22num_key_value_heads\22:2,\22num_local_experts\22:4,\22output_router_logits\22:false,\22pad_token_id\22:null,\22rms_norm_eps\22:1e-05,\22rope_parameters\22:{\22rope_theta\22:1000000.0,\22rope_type\22:\22default\22},\22router_aux_loss_coef\22:0.001,\22router_jitter_noise\22:0.01,\22sliding_window\22:null,\22tie_word_embeddings\22:false,\22transformers_version\22:\225.24.0\22,\22use_cache\22:true,\22vocab_size\22:128}" store "phimoe.moestore" {
    moe.tensor @model.embed_tokens.weight : tensor<128x32xbf16> = "model.embed_tokens.weight" in 0
    moe.tensor @model.layers.0.input_layernorm.weight : tensor<32xbf16> = "model.layers.0.input_layernorm.weight" in 0
    moe.tensor @model.layers.0.input_layernorm.bias : tensor<32xbf16> = "model.layers.0.input_layernorm.bias" in 0
    moe.tensor @model.layers.0.post_attention_layernorm.weight : tensor<32xbf16> = "model.layers.0.post_attention_layernorm.weight" in 0
    moe.tensor @model.layers.0.post_attention_layernorm.bias : tensor<32xbf16> = "model.layers.0.post_attention_layernorm.bias" in 0
    moe.tensor @model.layers.0.self_attn.q_proj.weight : tensor<32x32xbf16> = "model.layers.0.self_attn.q_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.k_proj.weight : tensor<16x32xbf16> = "model.layers.0.self_attn.k_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.v_proj.weight : tensor<16x32xbf16> = "model.layers.0.self_attn.v_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.o_proj.weight : tensor<32x32xbf16> = "model.layers.0.self_attn.o_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.q_proj.bias : tensor<32xbf16> = "model.layers.0.self_attn.q_proj.bias" in 0
    moe.tensor @model.layers.0.self_attn.k_proj.bias : tensor<16xbf16> = "model.layers.0.self_attn.k_proj.bias" in 0
    moe.tensor @model.layers.0.self_attn.v_proj.bias : tensor<16xbf16> = "model.layers.0.self_attn.v_proj.bias" in 0
    moe.tensor @model.layers.0.self_attn.o_proj.bias : tensor<32xbf16> = "model.layers.0.self_attn.o_proj.bias" in 0
    moe.tensor @model.layers.0.block_sparse_moe.gate.weight : tensor<4x32xbf16> = "model.layers.0.block_sparse_moe.gate.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.0.w1.weight : tensor<24x32xbf16> = "model.layers.0.block_sparse_moe.experts.0.w1.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.0.w3.weight : tensor<24x32xbf16> = "model.layers.0.block_sparse_moe.experts.0.w3.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.0.w2.weight : tensor<32x24xbf16> = "model.layers.0.block_sparse_moe.experts.0.w2.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.1.w1.weight : tensor<24x32xbf16> = "model.layers.0.block_sparse_moe.experts.1.w1.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.1.w3.weight : tensor<24x32xbf16> = "model.layers.0.block_sparse_moe.experts.1.w3.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.1.w2.weight : tensor<32x24xbf16> = "model.layers.0.block_sparse_moe.experts.1.w2.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.2.w1.weight : tensor<24x32xbf16> = "model.layers.0.block_sparse_moe.experts.2.w1.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.2.w3.weight : tensor<24x32xbf16> = "model.layers.0.block_sparse_moe.experts.2.w3.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.2.w2.weight : tensor<32x24xbf16> = "model.layers.0.block_sparse_moe.experts.2.w2.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.3.w1.weight : tensor<24x32xbf16> = "model.layers.0.block_sparse_moe.experts.3.w1.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.3.w3.weight : tensor<24x32xbf16> = "model.layers.0.block_sparse_moe.experts.3.w3.weight" in 0
    moe.tensor @model.layers.0.block_sparse_moe.experts.3.w2.weight : tensor<32x24xbf16> = "model.layers.0.block_sparse_moe.experts.3.w2.weight" in 0
    moe.tensor @model.layers.1.input_layernorm.weight : tensor<32xbf16> = "model.layers.1.input_layernorm.weight" in 0
    moe.tensor @model.layers.1.input_layernorm.bias : tensor<32xbf16> = "model.layers.1.input_layernorm.bias" in 0
    moe.tensor @model.layers.1.post_attention_layernorm.weight : tensor<32xbf16> = "model.layers.1.post_attention_layernorm.weight" in 0
    moe.tensor @model.layers.1.post_attention_layernorm.bias : tensor<32xbf16> = "model.layers.1.post_attention_layernorm.bias" in 0
    moe.tensor @model.layers.1.self_attn.q_proj.weight : tensor<32x32xbf16> = "model.layers.1.self_attn.q_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.k_proj.weight : tensor<16x32xbf16> = "model.layers.1.self_attn.k_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.v_proj.weight : tensor<16x32xbf16> = "model.layers.1.self_attn.v_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.o_proj.weight : tensor<32x32xbf16> = "model.layers.1.self_attn.o_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.q_proj.bias : tensor<32xbf16> = "model.layers.1.self_attn.q_proj.bias" in 0
    moe.tensor @model.layers.1.self_attn.k_proj.bias : tensor<16xbf16> = "model.layers.1.self_attn.k_proj.bias" in 0
    moe.tensor @model.layers.1.self_attn.v_proj.bias : tensor<16xbf16> = "model.layers.1.self_attn.v_proj.bias" in 0
    moe.tensor @model.layers.1.self_attn.o_proj.bias : tensor<32xbf16> = "model.layers.1.self_attn.o_proj.bias" in 0
    moe.tensor @model.layers.1.block_sparse_moe.gate.weight : tensor<4x32xbf16> = "model.layers.1.block_sparse_moe.gate.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.0.w1.weight : tensor<24x32xbf16> = "model.layers.1.block_sparse_moe.experts.0.w1.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.0.w3.weight : tensor<24x32xbf16> = "model.layers.1.block_sparse_moe.experts.0.w3.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.0.w2.weight : tensor<32x24xbf16> = "model.layers.1.block_sparse_moe.experts.0.w2.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.1.w1.weight : tensor<24x32xbf16> = "model.layers.1.block_sparse_moe.experts.1.w1.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.1.w3.weight : tensor<24x32xbf16> = "model.layers.1.block_sparse_moe.experts.1.w3.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.1.w2.weight : tensor<32x24xbf16> = "model.layers.1.block_sparse_moe.experts.1.w2.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.2.w1.weight : tensor<24x32xbf16> = "model.layers.1.block_sparse_moe.experts.2.w1.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.2.w3.weight : tensor<24x32xbf16> = "model.layers.1.block_sparse_moe.experts.2.w3.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.2.w2.weight : tensor<32x24xbf16> = "model.layers.1.block_sparse_moe.experts.2.w2.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.3.w1.weight : tensor<24x32xbf16> = "model.layers.1.block_sparse_moe.experts.3.w1.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.3.w3.weight : tensor<24x32xbf16> = "model.layers.1.block_sparse_moe.experts.3.w3.weight" in 0
    moe.tensor @model.layers.1.block_sparse_moe.experts.3.w2.weight : tensor<32x24xbf16> = "model.layers.1.block_sparse_moe.experts.3.w2.weight" in 0
    moe.tensor @model.norm.weight : tensor<32xbf16> = "model.norm.weight" in 0
    moe.tensor @model.norm.bias : tensor<32xbf16> = "model.norm.bias" in 0
    moe.tensor @lm_head.weight : tensor<128x32xbf16> = "lm_head.weight" in 0
    moe.tensor @lm_head.bias : tensor<128xbf16> = "lm_head.bias" in 0
    moe.dense "embedding" {embedding = @model.embed_tokens.weight}
    moe.dense "lm_head" {lm_head = @lm_head.weight, lm_head_bias = @lm_head.bias}
    moe.dense "norms" {final_norm = @model.norm.weight, final_norm_bias = @model.norm.bias}
    moe.layer 0 {
      moe.dense "attention" {k_bias = @model.layers.0.self_attn.k_proj.bias, k_proj = @model.layers.0.self_attn.k_proj.weight, o_bias = @model.layers.0.self_attn.o_proj.bias, o_proj = @model.layers.0.self_attn.o_proj.weight, q_bias = @model.layers.0.self_attn.q_proj.bias, q_proj = @model.layers.0.self_attn.q_proj.weight, v_bias = @model.layers.0.self_attn.v_proj.bias, v_proj = @model.layers.0.self_attn.v_proj.weight}
      moe.dense "norms" {attention_norm = @model.layers.0.input_layernorm.weight, attention_norm_bias = @model.layers.0.input_layernorm.bias, mlp_norm = @model.layers.0.post_attention_layernorm.weight, mlp_norm_bias = @model.layers.0.post_attention_layernorm.bias}
      moe.moe_block {
        moe.router @model.layers.0.block_sparse_moe.gate.weight top_k 2 scoring "sparsemixer" selection "top-k" {jitter = 1.000000e-02 : f64}
        moe.expert 0 width 24 gate @model.layers.0.block_sparse_moe.experts.0.w1.weight up @model.layers.0.block_sparse_moe.experts.0.w3.weight down @model.layers.0.block_sparse_moe.experts.0.w2.weight
        moe.expert 1 width 24 gate @model.layers.0.block_sparse_moe.experts.1.w1.weight up @model.layers.0.block_sparse_moe.experts.1.w3.weight down @model.layers.0.block_sparse_moe.experts.1.w2.weight
        moe.expert 2 width 24 gate @model.layers.0.block_sparse_moe.experts.2.w1.weight up @model.layers.0.block_sparse_moe.experts.2.w3.weight down @model.layers.0.block_sparse_moe.experts.2.w2.weight
        moe.expert 3 width 24 gate @model.layers.0.block_sparse_moe.experts.3.w1.weight up @model.layers.0.block_sparse_moe.experts.3.w3.weight down @model.layers.0.block_sparse_moe.experts.3.w2.weight
      }
    }
    moe.layer 1 {
      moe.dense "attention" {k_bias = @model.layers.1.self_attn.k_proj.bias, k_proj = @model.layers.1.self_attn.k_proj.weight, o_bias = @model.layers.1.self_attn.o_proj.bias, o_proj = @model.layers.1.self_attn.o_proj.weight, q_bias = @model.layers.1.self_attn.q_proj.bias, q_proj = @model.layers.1.self_attn.q_proj.weight, v_bias = @model.layers.1.self_attn.v_proj.bias, v_proj = @model.layers.1.self_attn.v_proj.weight}
      moe.dense "norms" {attention_norm = @model.layers.1.input_layernorm.weight, attention_norm_bias = @model.layers.1.input_layernorm.bias, mlp_norm = @model.layers.1.post_attention_layernorm.weight, mlp_norm_bias = @model.layers.1.post_attention_layernorm.bias}
      moe.moe_block {
        moe.router @model.layers.1.block_sparse_moe.gate.weight top_k 2 scoring "sparsemixer" selection "top-k" {jitter = 1.000000e-02 : f64}
        moe.expert 0 width 24 gate @model.layers.1.block_sparse_moe.experts.0.w1.weight up @model.layers.1.block_sparse_moe.experts.0.w3.weight down @model.layers.1.block_sparse_moe.experts.0.w2.weight
        moe.expert 1 width 24 gate @model.layers.1.block_sparse_moe.experts.1.w1.weight up @model.layers.1.block_sparse_moe.experts.1.w3.weight down @model.layers.1.block_sparse_moe.experts.1.w2.weight
        moe.expert 2 width 24 gate @model.layers.1.block_sparse_moe.experts.2.w1.weight up @model.layers.1.block_sparse_moe.experts.2.w3.weight down @model.layers.1.block_sparse_moe.experts.2.w2.weight
        moe.expert 3 width 24 gate @model.layers.1.block_sparse_moe.experts.3.w1.weight up @model.layers.1.block_sparse_moe.experts.3.w3.weight down @model.layers.1.block_sparse_moe.experts.3.w2.weight
      }
    }
  }
}

