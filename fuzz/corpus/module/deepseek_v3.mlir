module {
  moe.model @model family "deepseek_v3" hidden 32 sources ["model.safetensors"] config "{\22architectures\22:[\22DeepseekV3ForCausalLM\22],\22attention_bias\22:false,\22attention_dropout\22:0.0,\22bos_token_id\22:0,\22dtype\22:\22bfloat16\22,\22eos_token_id\22:1,\22first_k_dense_replace\22:1,\22head_dim\22:8,\22hidden_act\22:\22silu\22,\22hidden_size\22:32,\22initializer_range\22:0.2,\22intermediate_size\22:48,\22kv_lora_rank\22:16,\22max_position_embeddings\22:256,\22model_type\22:\22deepseek_v3\22,\22moe_intermediate_size\22:16,\22n_group\22:4,\22n_routed_experts\22:8,\22n_shared_experts\22:1,\22norm_topk_prob\22:true,\22num_attention_heads\22:4,\22num_experts_per_tok\22:2,\22num_hidden_layers\22:3,\22num_key_value_heads\22:4,\22num_nextn_predict_layers\22:1,\22output_router_logits\22:false,\22pad_token_id\22:null,\22pretraining_tp\22:1,\22q_lora_rank\22:24,\22qk_head_dim\22:16,\22qk_nope_head_dim\22:8,\22qk_rope_head_dim\22:8,\22rms_norm_eps\22:1e-06,\22rope_interleave\22:true,\22rope_parameters\22:{\22beta_fast\22:32.0,\22beta_slow\22:1.0,\22factor\22:40.0,\22mscale\22:1.0,\22mscale_all_dim\22:1.0,\22original_max_position_embeddings\22:64,\22rope_theta\22:10000.0,\22rope_type\22:\22yarn\22,\22type\22:\22yarn\22},\22routed_scaling_factor\22:2.5,\22tie_word_embeddings\22:false,\22topk_group\22:2,\22transformers_version\22:\225.24.0\22,\22use_cache\22:true,\22v_head_dim\22:8,\22vocab_size\22:128}" store "deepseek_v3.moestore" {
    moe.tensor @model.embed_tokens.weight : tensor<128x32xbf16> = "model.embed_tokens.weight" in 0
    moe.tensor @model.layers.0.input_layernorm.weight : tensor<32xbf16> = "model.layers.0.input_layernorm.weight" in 0
    moe.tensor @model.layers.0.post_attention_layernorm.weight : tensor<32xbf16> = "model.layers.0.post_attention_layernorm.weight" in 0
    moe.tensor @model.layers.0.self_attn.q_a_proj.weight : tensor<24x32xbf16> = "model.layers.0.self_attn.q_a_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.q_a_layernorm.weight : tensor<24xbf16> = "model.layers.0.self_attn.q_a_layernorm.weight" in 0
    moe.tensor @model.layers.0.self_attn.q_b_proj.weight : tensor<64x24xbf16> = "model.layers.0.self_attn.q_b_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.kv_a_proj_with_mqa.weight : tensor<24x32xbf16> = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" in 0
    moe.tensor @model.layers.0.self_attn.kv_a_layernorm.weight : tensor<16xbf16> = "model.layers.0.self_attn.kv_a_layernorm.weight" in 0
    moe.tensor @model.layers.0.self_attn.kv_b_proj.weight : tensor<64x16xbf16> = "model.layers.0.self_attn.kv_b_proj.weight" in 0
    moe.tensor @model.layers.0.self_attn.o_proj.weight : tensor<32x32xbf16> = "model.layers.0.self_attn.o_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.gate_proj.weight : tensor<48x32xbf16> = "model.layers.0.mlp.gate_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.up_proj.weight : tensor<48x32xbf16> = "model.layers.0.mlp.up_proj.weight" in 0
    moe.tensor @model.layers.0.mlp.down_proj.weight : tensor<32x48xbf16> = "model.layers.0.mlp.down_proj.weight" in 0
    moe.tensor @model.layers.1.input_layernorm.weight : tensor<32xbf16> = "model.layers.1.input_layernorm.weight" in 0
    moe.tensor @model.layers.1.post_attention_layernorm.weight : tensor<32xbf16> = "model.layers.1.post_attention_layernorm.weight" in 0
    moe.tensor @model.layers.1.self_attn.q_a_proj.weight : tensor<24x32xbf16> = "model.layers.1.self_attn.q_a_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.q_a_layernorm.weight : tensor<24xbf16> = "model.layers.1.self_attn.q_a_layernorm.weight" in 0
    moe.tensor @model.layers.1.self_attn.q_b_proj.weight : tensor<64x24xbf16> = "model.layers.1.self_attn.q_b_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.kv_a_proj_with_mqa.weight : tensor<24x32xbf16> = "model.layers.1.self_attn.kv_a_proj_with_mqa.weight" in 0
    moe.tensor @model.layers.1.self_attn.kv_a_layernorm.weight : tensor<16xbf16> = "model.layers.1.self_attn.kv_a_layernorm.weight" in 0
    moe.tensor @model.layers.1.self_attn.kv_b_proj.weight : tensor<64x16xbf16> = "model.layers.1.self_attn.kv_b_proj.weight" in 0
    moe.tensor @model.layers.1.self_attn.o_proj.weight : tensor<32x32xbf16> = "model.layers.1.self_attn.o_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.gate.weight : tensor<8x32xbf16> = "model.layers.1.mlp.gate.weight" in 0
    moe.tensor @model.layers.1.mlp.gate.e_score_correction_bias : tensor<8xbf16> = "model.layers.1.mlp.gate.e_score_correction_bias" in 0
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
    moe.tensor @model.layers.1.mlp.experts.4.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.4.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.4.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.4.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.4.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.experts.4.down_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.5.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.5.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.5.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.5.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.5.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.experts.5.down_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.6.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.6.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.6.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.6.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.6.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.experts.6.down_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.7.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.7.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.7.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.experts.7.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.experts.7.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.experts.7.down_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.shared_experts.gate_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.shared_experts.gate_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.shared_experts.up_proj.weight : tensor<16x32xbf16> = "model.layers.1.mlp.shared_experts.up_proj.weight" in 0
    moe.tensor @model.layers.1.mlp.shared_experts.down_proj.weight : tensor<32x16xbf16> = "model.layers.1.mlp.shared_experts.down_proj.weight" in 0
    moe.tensor @model.layers.2.input_layernorm.weight : tensor<32xbf16> = "model.layers.2.input_layernorm.weight" in 0
    moe.tensor @model.layers.2.post_attention_layernorm.weight : tensor<32xbf16> = "model.layers.2.post_attention_layernorm.weight" in 0
    moe.tensor @model.layers.2.self_attn.q_a_proj.weight : tensor<24x32xbf16> = "model.layers.2.self_attn.q_a_proj.weight" in 0
    moe.tensor @model.layers.2.self_attn.q_a_layernorm.weight : tensor<24xbf16> = "model.layers.2.self_attn.q_a_layernorm.weight" in 0
    moe.tensor @model.layers.2.self_attn.q_b_proj.weight : tensor<64x24xbf16> = "model.layers.2.self_attn.q_b_proj.weight" in 0
    moe.tensor @model.layers.2.self_attn.kv_a_proj_with_mqa.weight : tensor<24x32xbf16> = "model.layers.2.self_attn.kv_a_proj_with_mqa.weight" in 0
    moe.tensor @model.layers.2.self_attn.kv_a_layernorm.weight : tensor<16xbf16> = "model.layers.2.self_attn.kv_a_layernorm.weight" in 0
    moe.tensor @model.layers.2.self_attn.kv_b_proj.weight : tensor<64x16xbf16> = "model.layers.2.self_attn.kv_b_proj.weight" in 0
    moe.tensor @model.layers.2.self_attn.o_proj.weight : tensor<32x32xbf16> = "model.layers.2.self_attn.o_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.gate.weight : tensor<8x32xbf16> = "model.layers.2.mlp.gate.weight" in 0
    moe.tensor @model.layers.2.mlp.gate.e_score_correction_bias : tensor<8xbf16> = "model.layers.2.mlp.gate.e_score_correction_bias" in 0
    moe.tensor @model.layers.2.mlp.experts.0.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.0.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.0.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.0.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.0.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.experts.0.down_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.1.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.1.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.1.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.1.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.1.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.experts.1.down_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.2.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.2.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.2.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.2.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.2.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.experts.2.down_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.3.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.3.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.3.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.3.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.3.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.experts.3.down_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.4.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.4.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.4.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.4.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.4.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.experts.4.down_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.5.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.5.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.5.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.5.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.5.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.experts.5.down_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.6.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.6.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.6.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.6.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.6.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.experts.6.down_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.7.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.7.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.7.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.experts.7.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.experts.7.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.experts.7.down_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.shared_experts.gate_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.shared_experts.gate_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.shared_experts.up_proj.weight : tensor<16x32xbf16> = "model.layers.2.mlp.shared_experts.up_proj.weight" in 0
    moe.tensor @model.layers.2.mlp.shared_experts.down_proj.weight : tensor<32x16xbf16> = "model.layers.2.mlp.shared_experts.down_proj.weight" in 0
    moe.tensor @model.norm.weight : tensor<32xbf16> = "model.norm.weight" in 0
    moe.tensor @lm_head.weight : tensor<128x32xbf16> = "lm_head.weight" in 0
    moe.dense "embedding" {embedding = @model.embed_tokens.weight}
    moe.dense "lm_head" {lm_head = @lm_head.weight}
    moe.dense "norms" {final_norm = @model.norm.weight}
    moe.layer 0 {
      moe.dense "attention" {kv_a_norm = @model.layers.0.self_attn.kv_a_layernorm.weight, kv_a_proj = @model.layers.0.self_attn.kv_a_proj_with_mqa.weight, kv_b_proj = @model.layers.0.self_attn.kv_b_proj.weight, o_proj = @model.layers.0.self_attn.o_proj.weight, q_a_norm = @model.layers.0.self_attn.q_a_layernorm.weight, q_a_proj = @model.layers.0.self_attn.q_a_proj.weight, q_b_proj = @model.layers.0.self_attn.q_b_proj.weight}
      moe.dense "dense_mlp" {dense_down = @model.layers.0.mlp.down_proj.weight, dense_gate = @model.layers.0.mlp.gate_proj.weight, dense_up = @model.layers.0.mlp.up_proj.weight}
      moe.dense "norms" {attention_norm = @model.layers.0.input_layernorm.weight, mlp_norm = @model.layers.0.post_attention_layernorm.weight}
    }
    moe.layer 1 {
      moe.dense "attention" {kv_a_norm = @model.layers.1.self_attn.kv_a_layernorm.weight, kv_a_proj = @model.layers.1.self_attn.kv_a_proj_with_mqa.weight, kv_b_proj = @model.layers.1.self_attn.kv_b_proj.weight, o_proj = @model.layers.1.self_attn.o_proj.weight, q_a_norm = @model.layers.1.self_attn.q_a_layernorm.weight, q_a_proj = @model.layers.1.self_attn.q_a_proj.weight, q_b_proj = @model.layers.1.self_attn.q_b_proj.weight}
      moe.dense "norms" {attention_norm = @model.layers.1.input_layernorm.weight, mlp_norm = @model.layers.1.post_attention_layernorm.weight}
      moe.moe_block {
        moe.router @model.layers.1.mlp.gate.weight top_k 2 scoring "sigmoid" selection "group-top2-sum" {correction_bias = @model.layers.1.mlp.gate.e_score_correction_bias, groups = 4 : i64, normalize = true, scaling = 2.500000e+00 : f64, top_k_groups = 2 : i64}
        moe.expert 0 width 16 gate @model.layers.1.mlp.experts.0.gate_proj.weight up @model.layers.1.mlp.experts.0.up_proj.weight down @model.layers.1.mlp.experts.0.down_proj.weight
        moe.expert 1 width 16 gate @model.layers.1.mlp.experts.1.gate_proj.weight up @model.layers.1.mlp.experts.1.up_proj.weight down @model.layers.1.mlp.experts.1.down_proj.weight
        moe.expert 2 width 16 gate @model.layers.1.mlp.experts.2.gate_proj.weight up @model.layers.1.mlp.experts.2.up_proj.weight down @model.layers.1.mlp.experts.2.down_proj.weight
        moe.expert 3 width 16 gate @model.layers.1.mlp.experts.3.gate_proj.weight up @model.layers.1.mlp.experts.3.up_proj.weight down @model.layers.1.mlp.experts.3.down_proj.weight
        moe.expert 4 width 16 gate @model.layers.1.mlp.experts.4.gate_proj.weight up @model.layers.1.mlp.experts.4.up_proj.weight down @model.layers.1.mlp.experts.4.down_proj.weight
        moe.expert 5 width 16 gate @model.layers.1.mlp.experts.5.gate_proj.weight up @model.layers.1.mlp.experts.5.up_proj.weight down @model.layers.1.mlp.experts.5.down_proj.weight
        moe.expert 6 width 16 gate @model.layers.1.mlp.experts.6.gate_proj.weight up @model.layers.1.mlp.experts.6.up_proj.weight down @model.layers.1.mlp.experts.6.down_proj.weight
        moe.expert 7 width 16 gate @model.layers.1.mlp.experts.7.gate_proj.weight up @model.layers.1.mlp.experts.7.up_proj.weight down @model.layers.1.mlp.experts.7.down_proj.weight
        moe.shared_expert width 16 gate @model.layers.1.mlp.shared_experts.gate_proj.weight up @model.layers.1.mlp.shared_experts.up_proj.weight down @model.layers.1.mlp.shared_experts.down_proj.weight
      }
    }
    moe.layer 2 {
      moe.dense "attention" {kv_a_norm = @model.layers.2.self_attn.kv_a_layernorm.weight, kv_a_proj = @model.layers.2.self_attn.kv_a_proj_with_mqa.weight, kv_b_proj = @model.layers.2.self_attn.kv_b_proj.weight, o_proj = @model.layers.2.self_attn.o_proj.weight, q_a_norm = @model.layers.2.self_attn.q_a_layernorm.weight, q_a_proj = @model.layers.2.self_attn.q_a_proj.weight, q_b_proj = @model.layers.2.self_attn.q_b_proj.weight}
      moe.dense "norms" {attention_norm = @model.layers.2.input_layernorm.weight, mlp_norm = @model.layers.2.post_attention_layernorm.weight}
      moe.moe_block {
        moe.router @model.layers.2.mlp.gate.weight top_k 2 scoring "sigmoid" selection "group-top2-sum" {correction_bias = @model.layers.2.mlp.gate.e_score_correction_bias, groups = 4 : i64, normalize = true, scaling = 2.500000e+00 : f64, top_k_groups = 2 : i64}
        moe.expert 0 width 16 gate @model.layers.2.mlp.experts.0.gate_proj.weight up @model.layers.2.mlp.experts.0.up_proj.weight down @model.layers.2.mlp.experts.0.down_proj.weight
        moe.expert 1 width 16 gate @model.layers.2.mlp.experts.1.gate_proj.weight up @model.layers.2.mlp.experts.1.up_proj.weight down @model.layers.2.mlp.experts.1.down_proj.weight
        moe.expert 2 width 16 gate @model.layers.2.mlp.experts.2.gate_proj.weight up @model.layers.2.mlp.experts.2.up_proj.weight down @model.layers.2.mlp.experts.2.down_proj.weight
        moe.expert 3 width 16 gate @model.layers.2.mlp.experts.3.gate_proj.weight up @model.layers.2.mlp.experts.3.up_proj.weight down @model.layers.2.mlp.experts.3.down_proj.weight
        moe.expert 4 width 16 gate @model.layers.2.mlp.experts.4.gate_proj.weight up @model.layers.2.mlp.experts.4.up_proj.weight down @model.layers.2.mlp.experts.4.down_proj.weight
        moe.expert 5 width 16 gate @model.layers.2.mlp.experts.5.gate_proj.weight up @model.layers.2.mlp.experts.5.up_proj.weight down @model.layers.2.mlp.experts.5.down_proj.weight
        moe.expert 6 width 16 gate @model.layers.2.mlp.experts.6.gate_proj.weight up @model.layers.2.mlp.experts.6.up_proj.weight down @model.layers.2.mlp.experts.6.down_proj.weight
        moe.expert 7 width 16 gate @model.layers.2.mlp.experts.7.gate_proj.weight up @model.layers.2.mlp.experts.7.up_proj.weight down @model.layers.2.mlp.experts.7.down_proj.weight
        moe.shared_expert width 16 gate @model.layers.2.mlp.shared_experts.gate_proj.weight up @model.layers.2.mlp.shared_experts.up_proj.weight down @model.layers.2.mlp.shared_experts.down_proj.weight
      }
    }
  }
}

