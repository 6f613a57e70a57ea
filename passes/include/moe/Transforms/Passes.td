//===- Passes.td - Passes over the moe dialect -------------*- tablegen -*-===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#ifndef MOE_TRANSFORMS_PASSES_TD
#define MOE_TRANSFORMS_PASSES_TD

include "mlir/Pass/PassBase.td"

def MoeDropExperts : Pass<"moe-drop-experts", "::moe::ir::ModelOp"> {
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

def MoePruneExperts : Pass<"moe-prune-experts", "::moe::ir::ModelOp"> {
  let summary = "Remove the experts that calibration scores lowest";
  let description = [{
    Scores every routed expert from a calibration statistics file
    (`moec calibrate`) and removes the lowest-scored ones, per layer or
    across the model, as `moe-drop-experts` does. Methods: `frequency`
    (tokens routed to the expert), `gate-weight` (sum of its routing
    weights), `easy-ep` (EASY-EP as published: the sum over routed tokens of
    g x ||E(x)|| x c_t, with c_t = max(1 - cos(h, h + r), 0) for the
    residual stream h entering the block and the routed experts' output r,
    shared experts excluded; it deviates from the paper only in scoring the
    calibration data given rather than its 25 longest domain samples),
    `tcess` (PreMoe's released scoring: the mean over tokens of the raw
    router logit of each token's top-1 expert), `reconstruction` (NAEE:
    the subset whose removal changes the layer's cached block outputs least
    in Frobenius norm, with the dropped experts' router rows masked, as the
    released code does; needs `moec calibrate --block-samples N`; per
    layer). Every expert runs once on the samples; a masked routing's error
    then comes from products of the expert outputs (one routing and K^2
    products per sample), so the search is exact and cheap. Every subset is
    scored when there are at most `max-subsets` and subsets x samples is at
    most `search-budget` million routings, else experts are removed greedily
    one at a time. Deviation: NAEE sums each calibration batch's Frobenius
    norm; moec takes the norm over all samples at once (the same argmin
    when there is one batch).
    Super experts are kept unless `protect-super-experts=false`. The rule
    is the released code's (Su et al., Super-Experts-Profilling): among the
    routed and shared experts of the first round(0.75 x layers) layers, an
    expert whose largest |down_proj output| over the calibration tokens
    routed to it is above the 99.5th percentile of all of them (numpy's
    linear interpolation) and above floor(largest / 10). Deviations: the
    maximum is over every routed token, where the released hook reads only
    the first row of a 2-D expert output; shared experts of every family
    count, where its name filter ("experts") misses Qwen2-MoE's
    `shared_expert`; statistics written before shared maxima were recorded
    leave shared experts out of the pool. A layer never keeps fewer experts than
    its top-k; ties go to the lower expert id being kept.

    ```mlir
    // moe-opt --moe-prune-experts="stats=stats.safetensors method=easy-ep ratio=0.25"
    ```
  }];
  let options = [
    Option<"stats", "stats", "std::string", /*default=*/"\"\"", "Calibration statistics file (required)">,
    Option<"method", "method", "::moe::ExpertScore", /*default=*/"::moe::ExpertScore::Frequency",
           "frequency, gate-weight, easy-ep, tcess or reconstruction">,
    Option<"ratio", "ratio", "double", /*default=*/"0.0", "Fraction of routed experts to remove">,
    Option<"keep", "keep", "int64_t", /*default=*/"0", "Experts to keep per layer (instead of ratio)">,
    Option<"scope", "scope", "::moe::PruneScope", /*default=*/"::moe::PruneScope::Layer", "layer or global">,
    Option<"protectSuperExperts", "protect-super-experts", "bool", /*default=*/"true",
           "Never remove super experts">,
    Option<"maxSubsets", "max-subsets", "int64_t", /*default=*/"20000",
           "reconstruction: enumerate every subset up to this many per layer, else search greedily">,
    Option<"searchBudget", "search-budget", "int64_t", /*default=*/"400",
           "reconstruction: enumerate every subset only when subsets x block samples is at most this many million "
           "routings, else search greedily">,
  ];
  let statistics = [
    Statistic<"expertsPruned", "experts-pruned", "Experts removed">,
    Statistic<"superExpertsProtected", "super-experts-protected", "Super experts kept">,
    Statistic<"subsetsEvaluated", "subsets-evaluated", "Expert subsets scored by reconstruction">,
  ];
}

def MoeSetTopk : Pass<"moe-set-topk", "::moe::ir::ModelOp"> {
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

def MoeDynamicSkip : Pass<"moe-dynamic-skip", "::moe::ir::ModelOp"> {
  let summary = "Calibrate per-layer thresholds for skipping weak routed experts at run time";
  let description = [{
    NAEE's dynamic skipping (MC-MoE's ODP rule): for each MoE layer with
    top-k >= 2, beta is the `quantile` (NAEE: the median) over calibration
    tokens of w2 / w1, the ratio of the second-largest to the largest routing
    weight, computed by running the layer's router on the cached block inputs
    (`moec calibrate --block-samples N`). The engine then skips every chosen
    expert but the first whose weight is below beta x w1 and rescales the
    kept weights to the chosen total; `moec eval` reports the experts run
    per token. Stored as the router's `skip_threshold`.

    ```mlir
    // moe-opt --moe-dynamic-skip="stats=stats.safetensors quantile=0.5"
    ```
  }];
  let options = [
    Option<"stats", "stats", "std::string", /*default=*/"\"\"", "Calibration statistics with block samples (required)">,
    Option<"quantile", "quantile", "double", /*default=*/"0.5",
           "Quantile of w2/w1 used as the threshold (higher skips more)">,
  ];
  let statistics = [
    Statistic<"layersThresholded", "layers-thresholded", "Routers given a skip threshold">,
  ];
}

def MoeMergeExperts : Pass<"moe-merge-experts", "::moe::ir::ModelOp"> {
  let summary = "Merge similar experts (M-SMoE) or recombine dropped experts' neurons (DERN)";
  let description = [{
    `method=msmoe` (M-SMoE, Li et al. 2024): per layer, expert usage
    frequencies from calibration; the number of groups per layer is chosen
    globally (each layer's most used expert counts as frequency 1, the
    threshold is the G-th largest frequency over all layers, so every layer
    keeps at least one group); the most used experts of a layer are the
    group centres and every other expert joins its most similar centre
    (`similarity=router-logits`: cosine of router-logit columns from the
    calibration Gram matrix; `weights`: cosine of the flattened expert
    weights). Each group becomes one expert, the frequency-weighted average
    of its members' gate, up and down (optionally after permuting each
    member's neurons onto the centre's by a Hungarian assignment,
    `align=permutation`). The router keeps every row; its `remap` sends each
    row to its group's expert, which the engine runs once per token with the
    summed weight.

    `method=dern` (DERN, Zhou et al. 2025). No code was released and only
    the abstract and a second-hand summary of the paper were available, so
    the steps follow that description: per layer, the experts with the
    lowest routed gate weight are dropped and the router sliced as
    `moe-drop-experts` does; every neuron segment (gate row, up row, down
    column, compared by the cosine of their concatenation) of a dropped
    expert goes to the retained expert holding its most similar neuron
    when that similarity reaches `threshold`, and is discarded otherwise;
    each retained expert that received segments clusters its own and the
    received ones back to its width by weighted spherical k-means (weights:
    each segment's expert's routed gate weight; centroids start at the
    segments with the largest max |gate|; a centroid is its members'
    weighted mean direction, each member normalised first, at their
    weighted mean norm). Unknowns filled in here: the norm equalisation
    (as just described), 20 rounds at most, and the default `threshold`
    (0.2, measured on the fixtures; the paper sweeps 0 to about 0.6).

    `ratio` is the fraction of routed experts removed (G = (1 - ratio) x
    experts); `groups` instead gives the average number of groups (msmoe)
    or experts kept (dern) per layer. Super experts (the rule of
    `moe-prune-experts`) stay unmerged unless `protect-super-experts=false`.

    ```mlir
    // moe-opt --moe-merge-experts="stats=stats.safetensors method=msmoe ratio=0.5 align=permutation"
    ```
  }];
  let options = [
    Option<"stats", "stats", "std::string", /*default=*/"\"\"", "Calibration statistics file (required)">,
    Option<"method", "method", "::moe::MergeMethod", /*default=*/"::moe::MergeMethod::Msmoe", "msmoe or dern">,
    Option<"similarity", "similarity", "::moe::MergeSimilarity", /*default=*/"::moe::MergeSimilarity::RouterLogits",
           "msmoe: router-logits or weights">,
    Option<"ratio", "ratio", "double", /*default=*/"0.0", "Fraction of routed experts removed">,
    Option<"groups", "groups", "int64_t", /*default=*/"0", "Average groups (experts kept) per layer, instead of ratio">,
    Option<"align", "align", "::moe::MergeAlign", /*default=*/"::moe::MergeAlign::None", "msmoe: none or permutation">,
    Option<"threshold", "threshold", "double", /*default=*/"0.2", "dern: least neuron cosine similarity to recombine">,
    Option<"protectSuperExperts", "protect-super-experts", "bool", /*default=*/"true",
           "Never merge super experts">,
  ];
  let statistics = [
    Statistic<"expertsMerged", "experts-merged", "Experts folded into another">,
    Statistic<"neuronsRecombined", "neurons-recombined", "Neurons of dropped experts recombined (dern)">,
  ];
}

def MoeMixExperts : Pass<"moe-mix-experts", "::moe::ir::ModelOp"> {
  let summary = "Replace experts by weighted sums of their layer's experts (EEP's expert merging)";
  let description = [{
    Each listed target expert of a layer becomes sum_i c_i x expert i, its
    gate, up and down alike (EEP's merge matrix, one row per target), with
    every source read as it was before the pass, so targets may name each
    other. Experts not listed keep their weights, and the router is not
    touched: `moec search --merge-evaluations` writes this pass before the
    `moe-drop-experts` of the experts it folded in. Sources and targets are
    expert ids of the layer as the pass finds them; they must have one
    width (mix before moe-prune-atoms, and before moe-allocate-bits splits
    experts). The mixed tensors keep the target's dtype.

    ```mlir
    // moe-opt --moe-mix-experts="mix=1:0=0.94*0|0.06*5,2=1.01*2;3:4=0.5*4|0.5*7"
    ```
  }];
  let options = [
    Option<"mix", "mix", "std::string", /*default=*/"\"\"",
           "Per layer, per target: 'layer:target=c*source|c*source,target=...;layer:...'">,
  ];
  let statistics = [
    Statistic<"expertsMixed", "experts-mixed", "Experts replaced by a weighted sum">,
  ];
}

def MoeFactorExperts : Pass<"moe-factor-experts", "::moe::ir::ModelOp"> {
  let summary = "Factor each layer's experts into a shared base plus low-rank deltas (D2MoE)";
  let description = [{
    D2MoE's delta decomposition, per MoE layer and per matrix (gate, up,
    down): the base is the experts' mean weighted by their calibration
    routing counts (D2MoE's frequency merge; its Fisher weighting needs
    weight gradients, which moec's backward pass does not make), and each
    expert's difference from it, W_i - base, is truncated by an SVD
    whitened with the expert's calibration input moments X^T X (SVD-LLM's
    truncation-aware whitening, as D2MoE's code does it: the SVD of
    (W_i - base) S with S S^T = X^T X, then a = U sqrt(Sigma) and
    b = sqrt(Sigma) V^T S^-1), so that a truncated singular value is the
    output error it costs on the expert's own routed tokens. Without moments
    in the statistics the SVD is plain and each expert's error is weighted
    by its routed tokens (a remark says so).

    Ranks (deviation from D2MoE, which gives every matrix the same rank):
    chosen per expert and matrix by one greedy budget per layer, in steps
    of `rank-multiple`. Every matrix starts at one step; then the step that
    removes the most calibration-weighted squared error per parameter goes
    next, until the layer's factored experts (base plus every factor) hold
    `ratio` of its routed experts' parameters. D2MoE's semi-dynamic
    pruning of the base is not done.

    The runtime runs the factored form directly: the base's gate and up
    once for every token of a batch, each expert's deltas as two thin
    products over its own tokens, and the base's down once over the
    routing-weighted sum of the experts' intermediates. Factors and base
    keep the experts' dtype; moe-quantize then quantises them too. Run it
    after passes that select, merge or slice experts; every expert of a
    layer must have one width.

    ```mlir
    // moe-opt --moe-factor-experts="stats=s.safetensors ratio=0.5"
    ```
  }];
  let options = [
    Option<"stats", "stats", "std::string", /*default=*/"\"\"",
           "Calibration statistics (required; with --input-moments for the whitened SVD)">,
    Option<"ratio", "ratio", "double", /*default=*/"0.5",
           "Fraction of each layer's routed-expert parameters the base and factors keep, in (0, 1)">,
    Option<"rankMultiple", "rank-multiple", "int64_t", /*default=*/"8", "Ranks are multiples of this">,
    Option<"whiten", "whiten", "bool", /*default=*/"true",
           "Whiten the SVD with the calibration input moments when the statistics have them">,
  ];
  let statistics = [
    Statistic<"expertsFactored", "experts-factored", "Experts replaced by a base plus low-rank deltas">,
    Statistic<"rankTotal", "rank-total", "Sum of the factors' ranks">,
  ];
}

def MoePruneAtoms : Pass<"moe-prune-atoms", "::moe::ir::ModelOp"> {
  let summary = "Remove the weakest neurons (atomic experts) of routed experts";
  let description = [{
    Scores every neuron j of every routed expert (its gate row, up row and
    down column) and removes the lowest, per layer or across the model,
    slicing the expert's tensors: experts end up with different widths,
    which the engine runs as they are. Every expert keeps at least
    `min-width` neurons. Shared experts are not touched.

    - `camera` (CAMERA-P): ||W_down[:, j]||^2 x ((1 - rho) sum_t a_tj^2 +
      rho max_t a_tj^2), with a_tj the neuron's activation times the token's
      routing weight (calibration's gate-weighted neuron statistics).
    - `heapr` (HEAPr, as published): S_ej = (1/N_e) sum_t x_tj^2 x
      w_j^T M_e w_j over the expert's N_e routed tokens, with x_tj the
      neuron's activation (the down projection's input), w_j its down
      column and M_e = (1/N_e) sum_t g_t g_t^T the empirical Fisher of the
      language-model loss in the expert's output space (g_t: the loss
      gradient at the expert's down output, routing weight included). As
      w_j^T g_t is the loss gradient at x_tj, the term is the mean squared
      activation gradient: the engine's backward pass records it
      (`moec calibrate --gradients`, which `moec compress` runs for this
      method), so no d x d matrix is ever held. Experts never routed score
      -1 (first to go); selection per `scope` (HEAPr's own is global). With
      `--all-experts` statistics the activation term counts every token
      (HEAPr's counts routed ones); calibrate without it to follow the paper.
    - `camera-sum`: ||W_down[:, j]||^2 x (1/N_e) sum_t (g_t x_tj)^2 with g_t
      the routing weight: what moec called HEAPr before it had a backward
      pass (the Gauss-Newton matrix of the block's squared output error,
      g_t^2 I, in place of the loss's Fisher); CAMERA's sum term over N_e.
    - `magnitude`: ||gate_j|| x ||up_j|| x ||W_down[:, j]|| (no calibration).

    ```mlir
    // moe-opt --moe-prune-atoms="stats=stats.safetensors method=camera ratio=0.25"
    ```
  }];
  let options = [
    Option<"stats", "stats", "std::string", /*default=*/"\"\"", "Calibration statistics (camera, heapr, camera-sum)">,
    Option<"method", "method", "::moe::AtomScore", /*default=*/"::moe::AtomScore::Camera", "camera, heapr, camera-sum or magnitude">,
    Option<"ratio", "ratio", "double", /*default=*/"0.0", "Fraction of routed-expert neurons removed">,
    Option<"scope", "scope", "::moe::PruneScope", /*default=*/"::moe::PruneScope::Layer", "layer or global">,
    Option<"rho", "rho", "double", /*default=*/"0.9", "camera: weight of the max term">,
    Option<"minWidth", "min-width", "int64_t", /*default=*/"1", "Neurons every expert keeps">,
  ];
  let statistics = [
    Statistic<"neuronsPruned", "neurons-pruned", "Neurons removed">,
  ];
}

def MoeQuantize : Pass<"moe-quantize", "::moe::ir::ModelOp"> {
  let summary = "Quantize weight matrices to a group-wise integer format";
  let description = [{
    Round-to-nearest (`method=rtn`) or GPTQ (`method=gptq`) quantization of
    every targeted matrix to
    a format of kernels/common/QuantFormat.h: `bits` 2, 3, 4 or 8, `group`
    32, 64 or 128 weights along the input dimension, symmetric (GPTQ's zero
    point) or asymmetric (min and scale), fp16 or bf16 scales. The packed
    bytes go to the WeightStore and the tensor gets a `#moe.quant` attribute;
    its symbol and logical type stay, so every use is unchanged. `moec eval`
    runs the module through the integer kernels (`--simulate-quantized`
    runs the dequantized values instead). Targets: `experts` (routed),
    `shared`, `attention`, `dense` (dense-layer MLPs), or `all` of these,
    and separately `lm_head` and `embedding` (read one row per token),
    comma-separated. Routers and norms stay as they are.

    `format=q4_k` (or q4_0, q4_1, q5_0, q5_1, q8_0, q2_k, q3_k, q5_k, q6_k)
    quantizes to llama.cpp's block format instead (kernels/common/
    GgmlFormats.h): RTN with its weighted scale search, GPTQ with the
    format's own grid (a K-quant's quantized sub-block scales chosen when
    the super-block's first column comes up, weighted by the Hessian's
    diagonal). `moec export --format gguf` copies these bytes. A matrix whose
    rows are not whole blocks (K-quants: 256 values) gets the nearest
    32-value format instead, with a remark; a `moe.bits` width from
    moe-allocate-bits picks the K-quant of that width. The engine runs these
    formats in place (kernels/cpu/GgmlKernels.h).

    GPTQ uses each expert's Hessians from `moec calibrate --input-moments`
    (X^T X of its routed inputs for gate/up, of its intermediate activation
    for down); attention projections (q/k/v and MLA's q_a/kv_a from the
    attention input, o from the attended values) and shared experts use
    the per-layer moments over every token; tensors without recorded inputs
    (MLA's q_b/kv_b, dense-layer MLPs, lm_head, embeddings) get RTN with a
    remark. Options:
    `damping`, lazy blocks of `block` columns and optional `act-order`
    (static groups, so groups stay contiguous). `precision` chooses the
    arithmetic of the Hessian's factorisation and of the error updates:
    `f64` (the default) or `f32`, as AutoGPTQ and GPTQModel run it (BLAS
    sgemm and LAPACK spotrf/strtri: twice the BLAS rate, 1.6x per
    DeepSeek-V3 expert; codes agree with f64's but for rare flips,
    BENCHMARKS.md). The Hessian is accumulated and damped in double
    either way; where float's factorisation fails (a Hessian positive
    definite only to double's precision), that Hessian is factored in
    double, said in a remark. `group-scales` chooses the
    weights a group's scales come from: `static` (the default: the original
    weights, GPTQModel's static_groups), `block` (the weights as of the
    group's lazy block: AutoGPTQ's find_params on W) or `running` (every
    update so far). `block` and `running` differ only when groups are
    smaller than `block`; `static` differs whenever a row has more than one
    group. At 2 bits with groups of 32, 64 and 128 static gave the lowest
    KL on both fixtures, and at 3-4 bits all three are within 0.05%
    perplexity (BENCHMARKS.md). An expert never silently
    loses its weights: when its moments saw fewer than `min-coverage` of the
    calibration tokens (GPTQModel's default 0.5%) it gets RTN and a remark
    naming its coverage; calibrate with `--all-experts` or
    `--sample-cap-ratio` to give rare experts statistics instead.

    `layers` limits the pass to the tensors of some decoder layers (-1 names
    the tensors outside layers: lm_head, embedding). `moec compress` runs
    GPTQ this way, one layer at a time: it calibrates layer l on what the
    already quantised layers before it compute, quantises layer l, and only
    then moves on (sequential GPTQ, with one layer's moments in memory).
    `experts` limits the routed experts to some slots: under
    `--max-memory`, `moec compress` gathers and quantises a layer's experts
    a chunk at a time. `codes` takes the packed codes of the selected
    matrices from a file instead (their format still from the options and
    `moe.bits`/`moe.format`, sizes checked): under `mpirun`, each process of
    `moec compress` quantises some experts and takes the others' codes so.
    `shares`/`share` split a layer's matrices outside routed experts
    (attention, shared experts, dense MLPs) the same way: each process of a distributed `moec
    compress` quantises one share, chosen by estimated GPTQ cost, the
    matrices that read one Hessian kept together.

    `nested-bits` (D2MoE's matryoshka / HOBBIT's mixed precision at run
    time): a group format of 4 or 8 bits is stored nested
    ("q4_g32_asym_n2", kernels/common/WeightFormat.h), its codes' top
    `nested-bits` bits (half of `bits`) first, as a complete low-bit matrix
    whose group scales are the least-squares fit of those top codes to the
    original weights, then the remaining bits with the high format's scales.
    One package then serves two budgets: `--max-memory` makes the engine
    load some experts' matrices at the low bits (reading only the first
    part) and the rest at the high bits (Description.h). Matrices that
    moe-allocate-bits gave another width stay plain. With `nested-cost`
    each routed expert matrix records, from the calibration statistics
    (`stats`), what its low bits cost: the tokens routed to the expert times
    the squared difference between its high and low values
    (`moe.nested_cost`, carried into packages); `--max-memory` then sends the
    cheapest experts low first. Without it the engine ranks experts by the
    squared difference alone.

    ```mlir
    // moe-opt --moe-quantize="bits=4 group=128 sym=false targets=experts,shared"
    ```
  }];
  let options = [
    Option<"method", "method", "::moe::QuantizeMethod", /*default=*/"::moe::QuantizeMethod::Rtn", "rtn or gptq">,
    Option<"stats", "stats", "std::string", /*default=*/"\"\"",
           "gptq: calibration statistics with --input-moments">,
    Option<"damping", "damping", "double", /*default=*/"0.01", "gptq: fraction of mean(diag H) added">,
    Option<"block", "block", "int64_t", /*default=*/"128", "gptq: columns per lazy-update block">,
    Option<"actOrder", "act-order", "bool", /*default=*/"false", "gptq: quantize columns by decreasing diag(H)">,
    Option<"groupScales", "group-scales", "::moe::GptqGroupScales", /*default=*/"::moe::GptqGroupScales::Static",
           "gptq: group scales from the original weights (static, GPTQModel's static_groups), the weights as of "
           "the lazy block's start (block, AutoGPTQ) or with every update so far (running)">,
    Option<"precision", "precision", "::moe::GptqPrecision", /*default=*/"::moe::GptqPrecision::F64",
           "gptq: arithmetic of the Hessian's factorisation and the error updates, f64 or f32 (AutoGPTQ's; 1.6x "
           "faster per DeepSeek-V3 expert, codes within rounding of f64's)">,
    Option<"minCoverage", "min-coverage", "double", /*default=*/"0.005",
           "gptq: experts whose moments saw fewer than this fraction of the calibration tokens get RTN">,
    Option<"bits", "bits", "int64_t", /*default=*/"4", "Bits per weight: 2, 3, 4 or 8">,
    Option<"group", "group", "int64_t", /*default=*/"128", "Weights per scale: 32, 64 or 128">,
    Option<"symmetric", "sym", "bool", /*default=*/"false", "Symmetric (no min) instead of asymmetric">,
    Option<"scaleType", "scale-type", "::moe::ScaleKind", /*default=*/"::moe::ScaleKind::F16", "f16 or bf16 scales">,
    Option<"nestedBits", "nested-bits", "int64_t", /*default=*/"0",
           "Store 4- or 8-bit group codes nested, their top bits (half) a low-bit matrix of their own; 0: plain">,
    Option<"nestedCost", "nested-cost", "bool", /*default=*/"false",
           "nested-bits: record each routed expert matrix's cost of its low bits from `stats` (routed tokens x "
           "squared value difference) for --max-memory to choose by">,
    Option<"format", "format", "::moe::QuantizeFormat", /*default=*/"::moe::QuantizeFormat::Group",
           "group (moec's: bits, group, sym, scale-type) or a llama.cpp block format: q4_0, q4_1, q5_0, q5_1, "
           "q8_0, q2_k, q3_k, q4_k, q5_k, q6_k">,
    ListOption<"targets", "targets", "::moe::QuantizeTarget",
               "experts, shared, attention, dense, all, lm_head, embedding (comma-separated; default experts)">,
    ListOption<"layers", "layers", "int64_t",
               "Only the tensors of these decoder layers (-1: those outside layers); empty: all">,
    ListOption<"experts", "experts", "int64_t",
               "Of the routed experts, only these slots (with every part of a split one); empty: all">,
    Option<"codes", "codes", "std::string", /*default=*/"\"\"",
           "Take each selected matrix's packed codes from this safetensors file (U8, named by the matrix's "
           "symbol; what another process of a distributed moec compress quantised) instead of quantising it">,
    Option<"shares", "shares", "int64_t", /*default=*/"1",
           "Split the matrices of decoder layers outside routed experts (attention, shared experts, dense MLPs) "
           "into this many shares of about equal GPTQ cost, and select only share `share` of them (a distributed "
           "moec compress gives one share to each process); 1: all">,
    Option<"share", "share", "int64_t", /*default=*/"0", "With shares > 1: the share selected, from 0">,
  ];
  let statistics = [
    Statistic<"tensorsQuantized", "tensors-quantized", "Matrices quantized">,
    Statistic<"gptqMatrices", "gptq-matrices", "Expert matrices quantized with GPTQ">,
    Statistic<"rtnFallbacks", "rtn-fallbacks", "Expert matrices given RTN for lack of calibration tokens">,
  ];
}

def MoeAllocateBits : Pass<"moe-allocate-bits", "::moe::ir::ModelOp"> {
  let summary = "Choose bits per expert (or expert matrix) under a memory budget";
  let description = [{
    MC-MoE's pre-loading mixed-precision allocation as an integer program
    solved with GLPK: one width from `candidates` per unit (a routed expert;
    with `granularity=matrix` one of its three matrices; with
    `granularity=micro-expert` `micro-size` of its neurons, ranked by
    CAMERA's importance ||W_down[:, j]||^2 x sum of (gate weight x a_j)^2 so
    that units are importance tiers, as CAMERA-Q), minimising the
    summed loss with the parameter-weighted average width equal to `budget`
    bits (pinned units included), or within `tolerance` below it; or, with
    `budget-bytes`, the quantized matrices of the allocated units (headers
    at the trial `group` and scheme included, padded groups counted) taking
    exactly that many bytes (`tolerance` stays in bits per weight; with
    micro-experts each unit's down columns are counted as padded on their
    own, an upper bound when parts join short units).
    Objectives:
    - `mc-moe`: phi^alpha x w^beta x q^alpha (alpha 1, beta 1.5), with phi
      the expert's routed-token share and w its router-probability share in
      its layer (both normalised to sum to 1 and scaled by 1000, as MC-MoE
      does), and q the Frobenius error of the layer's cached block outputs
      when only this unit is quantized (RTN at that width, through the
      engine's MoE block; needs `--block-samples`);
    - `hessian`: sum_j H_jj ||W[:, j] - Q[:, j]||^2 over the unit's matrices,
      with H from `--input-moments`.
    Super experts (the rule of `moe-prune-experts`) and shared experts are
    pinned at `pin-bits` (0: not
    pinned; shared experts are then left to moe-quantize's own `bits`).
    The result is a `moe.bits` attribute on each tensor, which
    `moe-quantize` executes (group and scheme from its own options). With
    micro-experts, an expert whose units got different widths is split into
    parts (consecutive `moe.expert` ops with the same id and `part_offset`),
    one per width, with its neurons regrouped; it computes exactly what it
    did. Passes that select, merge or slice experts then refuse the module,
    and GPTQ's down-projection Hessians need statistics calibrated after the
    split (`moec compress` calibrates GPTQ layer by layer anyway). A
    budget that cannot be met fails and names the closest feasible budget:
    below what the narrowest widths and the pins need, above what the widest
    give, or (units of unequal size) when no combination of widths lands in
    [budget - tolerance, budget]; then the closest averages below and above
    are named. One program for the whole model (MC-MoE solves each layer
    separately).

    `granularity=layer` gives one width to each matrix kind (gate, up,
    down) of a layer's routed experts together, the unit a GGUF file's
    stacked expert tensor holds (its loss is the sum of its experts'; super
    experts are not pinned apart).

    Candidates may name llama.cpp's block formats instead of widths
    (`candidates=q2_k,q3_k,q4_k`, each of a different width): the trial
    quantization of each unit is then that format's own quantizer (the
    nearest 32-value format where a matrix's rows are not whole blocks, as
    moe-quantize does), and every allocated tensor gets a `moe.format`
    attribute naming the format moe-quantize then writes. Budgets count
    the formats' nominal widths (Q4_K's 4, not its 4.5 bits per weight with
    scales); `budget-bytes` is refused with them.

    ```mlir
    // moe-opt --moe-allocate-bits="stats=s.safetensors budget=2.5 candidates=2,3,4" --moe-quantize="group=128"
    ```
  }];
  let options = [
    Option<"stats", "stats", "std::string", /*default=*/"\"\"", "Calibration statistics (required)">,
    Option<"budget", "budget", "double", /*default=*/"3.0", "Average bits per weight of the allocated units">,
    Option<"budgetBytes", "budget-bytes", "std::string", /*default=*/"\"\"",
           "Instead of budget: bytes of the allocated units' quantized matrices (1290240, 512M, 12G)">,
    Option<"tolerance", "tolerance", "double", /*default=*/"0.0",
           "How far below the budget the average may land (bits per weight; 0: exactly)">,
    ListOption<"candidates", "candidates", "std::string",
               "Candidate widths 2, 3, 4, 8 (moec's group formats) or llama.cpp formats q2_k .. q8_0 (default 2,3,4)">,
    Option<"granularity", "granularity", "::moe::Granularity", /*default=*/"::moe::Granularity::Expert",
           "expert, matrix, micro-expert or layer">,
    Option<"microSize", "micro-size", "int64_t", /*default=*/"0",
           "micro-expert: neurons per unit (0: the trial group size)">,
    Option<"objective", "objective", "::moe::AllocationObjective", /*default=*/"::moe::AllocationObjective::McMoe",
           "mc-moe or hessian">,
    Option<"group", "group", "int64_t", /*default=*/"128", "Group size of the trial quantization">,
    Option<"symmetric", "sym", "bool", /*default=*/"false", "Symmetric trial quantization">,
    Option<"pinBits", "pin-bits", "int64_t", /*default=*/"4", "Width of super and shared experts (0: no pin)">,
  ];
  let statistics = [
    Statistic<"unitsAllocated", "units-allocated", "Units given a width">,
    Statistic<"expertsSplit", "experts-split", "Experts split into parts of different widths">,
  ];
}

#endif // MOE_TRANSFORMS_PASSES_TD
