//===- Passes.td - Passes over the moe dialect -------------*- tablegen -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TRANSFORMS_PASSES_TD
#define MOE_TRANSFORMS_PASSES_TD

include "mlir/Pass/PassBase.td"

def MoeDropExperts : Pass<"moe-drop-experts", "::mlir::ModuleOp"> {
  let summary = "Remove the listed experts of the listed layers";
  let description = [{
    Switches experts off for good ("Mixture of Tunable Experts"-style expert
    silencing): the experts go, the router keeps only the rows of the
    remaining ones (a new tensor in the model's WeightStore, as is DeepSeek-V3's
    correction bias), and the remaining experts are renumbered 0..n-1 in their
    old order. Routing then behaves as the original model with the dropped
    experts masked out of the router's softmax/sigmoid and top-k.

    Group-limited routing: when every group loses the same number of experts
    the groups keep their (smaller, contiguous) membership; otherwise the
    layer falls back to ungrouped top-k (groups = 1) and a remark says so.
    Dropping so many experts that fewer than top_k remain is an error.

    ```mlir
    // moe-opt --moe-drop-experts="experts=1:0,3;2:5"
    ```
  }];
  let options = [
    Option<"experts", "experts", "std::string", /*default=*/"\"\"",
           "Experts to drop: 'layer:id,id;layer:id' (layer indices and expert ids)">,
  ];
  let statistics = [
    Statistic<"expertsDropped", "experts-dropped", "Experts removed">,
    Statistic<"parametersDropped", "parameters-dropped", "Expert parameters removed">,
  ];
}

def MoeSetTopk : Pass<"moe-set-topk", "::mlir::ModuleOp"> {
  let summary = "Set the number of routed experts each token uses";
  let description = [{
    ```mlir
    // moe-opt --moe-set-topk="top-k=1 layers=2,3"
    ```
  }];
  let options = [
    Option<"topK", "top-k", "int64_t", /*default=*/"0", "Experts per token (required)">,
    ListOption<"layers", "layers", "int64_t", "Layers to change (default: every MoE layer)">,
  ];
}

#endif // MOE_TRANSFORMS_PASSES_TD
