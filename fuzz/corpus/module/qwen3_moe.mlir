module {
  moe.model @model family "qwen3_moe" hidden 32 sources ["model.safetensors"] config "{\22architectures\22:[\22Qwen3MoeForCausalLM\22],\22attention_bias\22:false,\22attention_dropout\22:0.0,\22bos_token_id\22:null,\22decoder_sparse_step\22:1,\22dtype\22:\22bfloat16\22,\22eos_token_id\22:null,\22head_dim\22:16,\22hidden_act\22:\22silu\22,\22hidden_size\22:32,\22initializer_range\22:0.2,\22intermediate_size\22:48,\22max_position_embeddings\22:256,\22mlp_only_layers\22:[],\22model_type\22:\22qwen3_moe\22,\22moe_intermediate_size\22:16,\22norm_topk_prob\22:true,\22num_attention_heads\22:4,\22num_experts_per_tok\22:2,\22num_hidden_layers\22:2,\22num_key_value_heads\22:2,\22num_local_experts\22:4,\22output_router_logits\22:false,\22pad_token_id\22:null,\22rms_norm_eps\22:1e-06,\22rope_parameters\22:{\22rope_theta\22:10000.0,\22rope_type\22:\22default\22},\22router_aux_loss_coef\22:0.001,\22sliding_window\22:null,\22tie_word_embeddings\22:false,\22transformers_version\22:\225.24.0\22,\22use_cache\22:true,\22use_sliding_window\22:false,\22vocab_size\22:128}" store "qwen3_moe.moestore" {
    moe.tensor @model.embed_tokens.weight : tensor<128x32xbf16> = "model.embed_tokens.weight" in 0
    moe.tensor @model.layers.0.input_layernorm.weight : tensor<32xbf16> = "model.layers.0.input_layernorm.weight" in 0
    moe.tensor @model.layers.0.post_attention_layernorm.weight : tensor<32xbf16> = "model.layers.0.post_attention_layernorm.weight" in 0
    moe.tensor @model.layers.0.self_attn.q_proj.weight : tensor<64x32xbf16> = "model.layers.0.self_attn.q_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.k_proj.weight : tensor<32x32xbf16> = "model.layers.0.self_attn.k_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.v_proj.weight : tensor<32x32xbf16> = "model.layers.0.self_attn.v_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.o_proj.weight : tensor<32x64xbf16> = "model.layers.0.self_attn.o_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.q_norm.weight : tensor<16xbf16> = "model.layers.0.self_attn.q_norm.weight" in 0
    moe.tensor @model.layers.0.self_attn.k_norm.weight : tensor<16xbf16> = "model.layers.0.self_attn.k_norm.weight" in 0
    moe.tensor @model.layers.0.mlp.gate.weight : tensor<4x32xbf16> = "model.layers.0.mlp.gate.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.0.gate_proj.weight : tensor<16x32xbf16> = "model.layers.0.mlp.experts.0.gate_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.0.up_proj.weight : tensor<16x32xbf16> = "model.layers.0.mlp.experts.0.up_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.0.down_proj.weight : tensor<32x16xbf16> = "model.layers.0.mlp.experts.0.down_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.1.gate_proj.weight : tensor<16x32xbf16> = "model.layers.0.mlp.experts.1.gate_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.1.up_proj.weight : tensor<16x32xbf16> = "model.layers.0.mlp.experts.1.up_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.1.down_proj.weight : tensor<32x16xbf16> = "model.layers.0.mlp.experts.1.down_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.2.gate_proj.weight : tensor<16x32xbf16> = "model.layers.0.mlp.experts.2.gate_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.2.up_proj.weight : tensor<16x32xbf16> = "model.layers.0.mlp.experts.2.up_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.2.down_proj.weight : tensor<32x16xbf16> = "model.layers.0.mlp.experts.2.down_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.3.gate_proj.weight : tensor<16x32xbf16> = "model.layers.0.mlp.experts.3.gate_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.3.up_proj.weight : tensor<16x32xbf16> = "model.layers.0.mlp.experts.3.up_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.experts.3.down_proj.weight : tensor<32x16xbf16> = "model.layers.0.mlp.experts.3.down_proj.weight" in 0
    moe.tensor @model.layers.1.input_layernorm.weight : tensor<32xbf16> = "model.layers.1.input_layernorm.weight" in 0
    moe.tensor @model.layers.1.post_attention_layernorm.weight : tensor<32xbf16> = "model.layers.1.post_attention_layernorm.weight" in 0
    moe.tensor @model.layers.1.self_attn.q_proj.weight : tensor<64x32xbf16> = "model.layers.1.self_attn.q_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.k_proj.weight : tensor<32x32xbf16> = "model.layers.1.self_attn.k_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.v_proj.weight : tensor<32x32xbf16> = "model.layers.1.self_attn.v_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.o_proj.weight : tensor<32x64xbf16> = "model.layers.1.self_attn.o_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.q_norm.weight : tensor<16xbf16> = "model.layers.1.self_attn.q_norm.weight" in 0
    moe.tensor @model.layers.1.self_attn.k_norm.weight : tensor<16xbf16> = "model.layers.1.self_attn.k_norm.weight" in 0
    moe.tensor @model.layers.1.mlp.gate.weight : tensor<4x32xbf16> = "model.layers.1.mlp.gate.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.0.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.0.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.0.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.0.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.0.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.experts.0.down_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.1.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.1.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.1.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.1.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.1.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.experts.1.down_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.2.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.2.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.2.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.2.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.2.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.experts.2.down_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.3.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.3.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.3.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.3.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.3.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.experts.3.down_proj.weight" in 0
    moe.tensor @model.norm.weight : tensor<32xbf16> = "model.norm.weight" in 0
    moe.tensor @lm_head.weight : tensor<128x32xbf16> = "lm_head.weight" in 0
    moe.dense "embedding" {embedding = @model.embed_tokens.weight}
    moe.dense "lm_head" {lm_head = @lm_head.weight}
    moe.dense "norms" {final_norm = @model.norm.weight}
    moe.layer 0 {
      moe.dense "attention" {k_norm = @model.layers.0.self_attn.k_norm.weight, k_proj = @model.layers.0.self_attn.k_proj.weight, o_proj = @model.layers.0.self_attn.o_proj.weight, q_norm = @model.layers.0.self_attn.q_norm.weight, q_proj = @model.layers.0.self_attn.q_proj.weight, v_proj = @model.layers.0.self_attn.v_proj.weight}
      moe.dense "norms" {attention_norm = @model.layers.0.input_layernorm.weight, mlp_norm = @model.layers.0.post_attention_layernorm.weight}
      moe.moe_block {
        moe.router @model.layers.0.mlp.gate.weight top_k 2 scoring "softmax" selection "top-k" {normalize = true}
        moe.expert 0 width 16 gate @model.layers.0.mlp.experts.0.gate_proj.weight up @model.layers.0.mlp.experts.0.up_proj.weight down @model.layers.0.mlp.experts.0.down_proj.weight
        moe.expert 1 width 16 gate @model.layers.0.mlp.experts.1.gate_proj.weight up @model.layers.0.mlp.experts.1.up_proj.weight down @model.layers.0.mlp.experts.1.down_proj.weight
        moe.expert 2 width 16 gate @model.layers.0.mlp.experts.2.gate_proj.weight up @model.layers.0.mlp.experts.2.up_proj.weight down @model.layers.0.mlp.experts.2.down_proj.weight
        moe.expert 3 width 16 gate @model.layers.0.mlp.experts.3.gate_proj.weight up @model.layers.0.mlp.experts.3.up_proj.weight down @model.layers.0.mlp.experts.3.down_proj.weight
      }
    }
    moe.layer 1 {
      moe.dense "attention" {k_norm = @model.layers.1.self_attn.k_norm.weight, k_proj = @model.layers.1.self_attn.k_proj.weight, o_proj = @model.layers.1.self_attn.o_proj.weight, q_norm = @model.layers.1.self_attn.q_norm.weight, q_proj = @model.layers.1.self_attn.q_proj.weight, v_proj = @model.layers.1.self_attn.v_proj.weight}
      moe.dense "norms" {attention_norm = @model.layers.1.input_layernorm.weight, mlp_norm = @model.layers.1.post_attention_layernorm.weight}
      moe.moe_block {
        moe.router @model.layers.1.mlp.gate.weight top_k 2 scoring "softmax" selection "top-k" {normalize = true}
        moe.expert 0 width 16 gate @model.layers.1.mlp.experts.0.gate_proj.weight up @model.layers.1.mlp.experts.0.up_proj.weight down @model.layers.1.mlp.experts.0.down_proj.weight
        moe.expert 1 width 16 gate @model.layers.1.mlp.experts.1.gate_proj.weight up @model.layers.1.mlp.experts.1.up_proj.weight down @model.layers.1.mlp.experts.1.down_proj.weight
        moe.expert 2 width 16 gate @model.layers.1.mlp.experts.2.gate_proj.weight up @model.layers.1.mlp.experts.2.up_proj.weight down @model.layers.1.mlp.experts.2.down_proj.weight
        moe.expert 3 width 16 gate @model.layers.1.mlp.experts.3.gate_proj.weight up @model.layers.1.mlp.experts.3.up_proj.weight down @model.layers.1.mlp.experts.3.down_proj.weight
      }
    }
  }
}

