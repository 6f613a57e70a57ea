//===- MoeDialect.td - The moe dialect ---------------------*- tablegen -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_DIALECT_MOE_IR_MOEDIALECT_TD
#define MOE_DIALECT_MOE_IR_MOEDIALECT_TD

include "mlir/IR/OpBase.td"
include "mlir/IR/AttrTypeBase.td"

def Moe_Dialect : Dialect {
  let name = "moe";
  let summary = "Experts and routers of Mixture-of-Experts language models";
  let description = [{
    The `moe` dialect describes an MoE model at the level that compression
    works on: tensors (symbols that reference bytes in a checkpoint or in the
    module's WeightStore, never the bytes themselves), decoder layers with
    opaque dense parts, and MoE blocks made of a router, routed experts and
    an optional shared expert. A module of a 700 GB checkpoint is kilobytes.

    ```mlir
    moe.model @tiny family "mixtral" hidden 160 sources ["model.safetensors"] config "{...}" {
      moe.tensor @model.layers.0.block_sparse_moe.gate.weight : tensor<8x160xbf16> = "model.layers.0.block_sparse_moe.gate.weight" in 0
      moe.layer 0 {
        moe.moe_block {
          moe.router @model.layers.0.block_sparse_moe.gate.weight top_k 2 scoring "softmax" selection "top-k" {normalize = true}
          moe.expert 0 width 160 gate @... up @... down @...
        }
      }
    }
    ```
  }];
  let cppNamespace = "::moe::ir";
  let useDefaultAttributePrinterParser = 1;
}

class Moe_Op<string mnemonic, list<Trait> traits = []> : Op<Moe_Dialect, mnemonic, traits>;

def Moe_QuantAttr : AttrDef<Moe_Dialect, "Quant"> {
  let mnemonic = "quant";
  let summary = "How a tensor is quantised";
  let description = [{
    Group-wise integer quantisation: `bits` per weight, one scale (and, for
    `asym`, a zero point) per `group` consecutive weights of a row, in the
    layout named by `format` (declared in kernels/common).

    ```mlir
    #moe.quant<bits = 4, group = 128, scheme = "asym", format = "q4_g128_asym">
    ```
  }];
  let parameters = (ins "int64_t":$bits, "int64_t":$group, StringRefParameter<>:$scheme,
                        StringRefParameter<>:$format);
  let assemblyFormat = "`<` struct(params) `>`";
}

#endif // MOE_DIALECT_MOE_IR_MOEDIALECT_TD
