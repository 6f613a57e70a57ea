//===- MoeOps.td - Operations of the moe dialect -----------*- tablegen -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_DIALECT_MOE_IR_MOEOPS_TD
#define MOE_DIALECT_MOE_IR_MOEOPS_TD

include "moe/Dialect/Moe/IR/MoeDialect.td"
include "mlir/IR/SymbolInterfaces.td"
include "mlir/IR/RegionKindInterface.td"
include "mlir/IR/BuiltinAttributes.td"
include "mlir/IR/EnumAttr.td"

//===----------------------------------------------------------------------===//
// Router kinds (enum attributes, written as the quoted names)
//===----------------------------------------------------------------------===//

def Moe_ScoringKind : I32EnumAttr<"ScoringKind", "how router logits become expert scores", [
    I32EnumAttrCase<"Softmax", 0, "softmax">,
    I32EnumAttrCase<"Sigmoid", 1, "sigmoid">,
    I32EnumAttrCase<"SparseMixer", 2, "sparsemixer">]> {
  let cppNamespace = "::moe::ir";
}

def Moe_SelectionKind : I32EnumAttr<"SelectionKind", "how a token's experts are chosen from the scores", [
    I32EnumAttrCase<"TopK", 0, "top-k">,
    I32EnumAttrCase<"GroupMax", 1, "group-max">,
    I32EnumAttrCase<"GroupTopTwoSum", 2, "group-top2-sum">]> {
  let cppNamespace = "::moe::ir";
}

def Moe_ModelOp : Moe_Op<"model", [SymbolTable, Symbol, IsolatedFromAbove, NoTerminator,
                                   SingleBlock, NoRegionArguments]> {
  let summary = "A Mixture-of-Experts model";
  let description = [{
    The whole model: its family, hidden size, the checkpoint files its
    tensors come from (`sources`, paths relative to the module's directory or
    absolute), the original config.json text (from which the model's
    ModelSpec is derived; passes change structure in the IR, exporters
    update the config), and optionally the WeightStore that holds tensors
    passes wrote.

    Two discardable attributes hold the model's history: `moe.original`
    (set at import: experts and width per layer, stored bytes by role) and
    `moe.decisions` (appended by the passes that remove, merge or narrow
    experts: per pass and layer the experts seen by origin, their scores,
    routed tokens, and what was removed or merged into what). Reports read
    them; packages carry them in their provenance.

    ```mlir
    moe.model @m family "olmoe" hidden 2048 sources ["model.safetensors"] config "{...}" {
      ...
    }
    ```
  }];
  let arguments = (ins SymbolNameAttr:$sym_name, StrAttr:$family, I64Attr:$hidden,
                       StrArrayAttr:$sources, StrAttr:$config, OptionalAttr<StrAttr>:$store);
  let regions = (region SizedRegion<1>:$body);
  let assemblyFormat = [{
    $sym_name `family` $family `hidden` $hidden `sources` $sources `config` $config
    (`store` $store^)? attr-dict-with-keyword $body
  }];
  let hasVerifier = 1;
}

def Moe_TensorOp : Moe_Op<"tensor", [Symbol, HasParent<"ModelOp">]> {
  let summary = "A weight tensor and where its bytes are";
  let description = [{
    A symbol with the tensor's type and a reference to its bytes: `key` in
    source file number `source` of the model, or, without `in`, `key` in the
    model's WeightStore. An optional `#moe.quant` says how the stored bytes
    are quantised.

    ```mlir
    moe.tensor @w : tensor<1024x2048xbf16> = "model.layers.0.mlp.experts.0.up_proj.weight" in 0
    moe.tensor @w4 : tensor<1024x2048xbf16> = "experts.0.up.q4" quant #moe.quant<bits = 4, group = 128, scheme = "asym", format = "q4_g128_asym">
    ```

    `slice [i, r, n, t]` takes a 2-D piece of a stored 3-D tensor [N, A, B]
    (fused experts): rows r .. r+n-1 of matrix i, or of its transpose when
    t = 1.

    ```mlir
    moe.tensor @up3 : tensor<1024x2048xbf16> = "model.layers.0.mlp.experts.gate_up_proj" in 0 slice array<i64: 3, 1024, 1024, 0>
    ```
  }];
  let arguments = (ins SymbolNameAttr:$sym_name, TypeAttrOf<AnyRankedTensor>:$type, StrAttr:$key,
                       OptionalAttr<I64Attr>:$source, OptionalAttr<DenseI64ArrayAttr>:$slice,
                       OptionalAttr<Moe_QuantAttr>:$quant);
  let assemblyFormat = [{
    $sym_name `:` $type `=` $key (`in` $source^)? (`slice` $slice^)? (`quant` $quant^)? attr-dict
  }];
  let extraClassDeclaration = [{
    ::mlir::RankedTensorType getTensorType() {
      return ::llvm::cast<::mlir::RankedTensorType>(getType());
    }
  }];
  let hasVerifier = 1;
}

def Moe_LayerOp : Moe_Op<"layer", [HasParent<"ModelOp">, NoTerminator, SingleBlock,
                                   NoRegionArguments]> {
  let summary = "One decoder layer";
  let description = [{
    Dense parts (`moe.dense`) and, for MoE layers, one `moe.moe_block`.

    ```mlir
    moe.layer 3 { moe.dense "attention" {...} moe.moe_block {...} }
    ```
  }];
  let arguments = (ins I64Attr:$index);
  let regions = (region SizedRegion<1>:$body);
  let assemblyFormat = "$index attr-dict-with-keyword $body";
  let hasVerifier = 1;
}

def Moe_DenseOp : Moe_Op<"dense", [HasParent<"ModelOp, LayerOp">]> {
  let summary = "An opaque dense part: attention, norms, dense MLP, embedding, lm_head";
  let description = [{
    A part compression leaves as it is, with its tensors by role.

    ```mlir
    moe.dense "attention" {k_proj = @k, o_proj = @o, q_proj = @q, v_proj = @v}
    ```
  }];
  let arguments = (ins StrAttr:$part, DictionaryAttr:$tensors);
  let assemblyFormat = "$part $tensors attr-dict";
  let hasVerifier = 1;
}

def Moe_MoeBlockOp : Moe_Op<"moe_block", [HasParent<"LayerOp">, NoTerminator, SingleBlock,
                                          NoRegionArguments]> {
  let summary = "A router, its routed experts and an optional shared expert";
  let description = [{
    ```mlir
    moe.moe_block {
      moe.router @gate top_k 2 scoring "softmax" selection "top-k" {normalize = true}
      moe.expert 0 width 1024 gate @g0 up @u0 down @d0
      moe.expert 1 width 1024 gate @g1 up @u1 down @d1
    }
    ```
  }];
  let regions = (region SizedRegion<1>:$body);
  let assemblyFormat = "attr-dict-with-keyword $body";
  let hasVerifier = 1;
}

def Moe_RouterOp : Moe_Op<"router", [HasParent<"MoeBlockOp">]> {
  let summary = "How a token's experts and weights are chosen";
  let description = [{
    Router logits are `x . weight^T` over the rows of `weight`. `scoring` is
    softmax, sigmoid or sparsemixer; `selection` is top-k or group-limited
    (`groups`, `top_k_groups`); `normalize` renormalises the chosen weights,
    `scaling` multiplies them, `correction_bias` (DeepSeek-V3) biases the
    choice only. After merging, `remap` maps each router row to the expert
    id that serves it; `skip_threshold` drops routed experts whose weight is
    below it at run time.

    ```mlir
    moe.router @gate top_k 8 scoring "sigmoid" selection "group-top2-sum" {correction_bias = @bias, groups = 8, normalize = true, scaling = 2.5 : f64, top_k_groups = 4}
    ```
  }];
  let arguments = (ins FlatSymbolRefAttr:$weight, I64Attr:$top_k, Moe_ScoringKind:$scoring, Moe_SelectionKind:$selection,
                       DefaultValuedAttr<BoolAttr, "false">:$normalize,
                       DefaultValuedAttr<F64Attr, "1.0">:$scaling,
                       DefaultValuedAttr<I64Attr, "1">:$groups,
                       DefaultValuedAttr<I64Attr, "1">:$top_k_groups,
                       DefaultValuedAttr<F64Attr, "0.0">:$jitter,
                       OptionalAttr<FlatSymbolRefAttr>:$correction_bias,
                       OptionalAttr<DenseI64ArrayAttr>:$remap,
                       OptionalAttr<F64Attr>:$skip_threshold);
  let assemblyFormat = [{
    $weight `top_k` $top_k `scoring` custom<ScoringKind>($scoring) `selection` custom<SelectionKind>($selection)
    attr-dict
  }];
  let hasVerifier = 1;
}

def Moe_ExpertOp : Moe_Op<"expert", [HasParent<"MoeBlockOp">]> {
  let summary = "A routed expert: a gated MLP of its own width";
  let description = [{
    `y = down(act(gate x) * up x)`; `width` is the intermediate size, which
    atomic-expert pruning makes differ between experts.

    An expert may be split into parts (micro-expert mixed precision gives
    each part its own quantization format): consecutive `moe.expert` ops
    with the same id, each holding a segment of the expert's neurons, with
    `part_offset` the segment's first neuron (0, then the running sum of the
    parts' widths). The expert's output is the sum of its parts' outputs;
    the router sees one expert.

    ```mlir
    moe.expert 5 width 768 gate @g up @u down @d
    moe.expert 6 width 128 gate @g0 up @u0 down @d0 {part_offset = 0 : i64}
    moe.expert 6 width 640 gate @g1 up @u1 down @d1 {part_offset = 128 : i64}
    ```

    `origin` is the expert's id in the imported checkpoint once passes have
    renumbered experts (pruning, merging); absent, it equals `id`. Reports
    and `moec inspect` name experts by it.

    ```mlir
    moe.expert 2 width 768 gate @g up @u down @d {origin = 5 : i64}
    ```

    A factored expert (`moe-factor-experts`) carries `low_rank`, the right
    factors `[@gate_b, @up_b, @down_b]` (each `[rank, in]`); `gate`, `up`
    and `down` are then the left factors (`[out, rank]`), and each of its
    matrices is the block's `moe.expert_base` matrix plus the product of
    its two factors. Every expert of a block with a base is factored, none
    is split into parts.

    ```mlir
    moe.expert 0 width 768 gate @ga up @ua down @da {low_rank = [@gb, @ub, @db]}
    ```
  }];
  let arguments = (ins I64Attr:$id, I64Attr:$width, FlatSymbolRefAttr:$gate, FlatSymbolRefAttr:$up,
                       FlatSymbolRefAttr:$down, DefaultValuedAttr<StrAttr, "\"silu\"">:$activation,
                       OptionalAttr<I64Attr>:$part_offset, OptionalAttr<I64Attr>:$origin,
                       OptionalAttr<FlatSymbolRefArrayAttr>:$low_rank);
  let extraClassDeclaration = [{
    /// The id this expert had in the imported checkpoint.
    int64_t getOriginalId() {
      return static_cast<int64_t>(getOrigin().value_or(getId()));
    }
  }];
  let assemblyFormat = "$id `width` $width `gate` $gate `up` $up `down` $down attr-dict";
  let hasVerifier = 1;
}

def Moe_ExpertBaseOp : Moe_Op<"expert_base", [HasParent<"MoeBlockOp">]> {
  let summary = "The shared base of a block's factored experts";
  let description = [{
    `moe-factor-experts` replaces a block's routed experts by one base MLP
    (gate, up, down of the experts' width) and per expert a low-rank delta
    (`moe.expert`'s `low_rank`): expert i's gate is `gate + a_i b_i`, and so
    on. The runtime computes the base's products once per token batch.

    ```mlir
    moe.expert_base width 768 gate @bg up @bu down @bd
    ```
  }];
  let arguments = (ins I64Attr:$width, FlatSymbolRefAttr:$gate, FlatSymbolRefAttr:$up, FlatSymbolRefAttr:$down);
  let assemblyFormat = "`width` $width `gate` $gate `up` $up `down` $down attr-dict";
  let hasVerifier = 1;
}

def Moe_SharedExpertOp : Moe_Op<"shared_expert", [HasParent<"MoeBlockOp">]> {
  let summary = "An expert every token uses, optionally scaled by a sigmoid gate";
  let description = [{
    ```mlir
    moe.shared_expert width 5632 gate @g up @u down @d gated_by @shared_gate
    ```
  }];
  let arguments = (ins I64Attr:$width, FlatSymbolRefAttr:$gate, FlatSymbolRefAttr:$up,
                       FlatSymbolRefAttr:$down, OptionalAttr<FlatSymbolRefAttr>:$gated_by);
  let assemblyFormat = "`width` $width `gate` $gate `up` $up `down` $down (`gated_by` $gated_by^)? attr-dict";
  let hasVerifier = 1;
}

#endif // MOE_DIALECT_MOE_IR_MOEOPS_TD
