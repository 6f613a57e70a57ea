//===- PassOptions.cpp - The spellings of the passes' enumerated options --===//
//
// Part of moec.
//
//===----------------------------------------------------------------------===//

#include "moe/Transforms/PassOptions.h"

namespace moe {

#define MOE_CHOICES(E, ...)                                                                                            \
  template <> llvm::ArrayRef<Choice<E>> choices<E>() {                                                                 \
    static const Choice<E> table[] = {__VA_ARGS__};                                                                    \
    return table;                                                                                                      \
  }

MOE_CHOICES(ExpertScore, {"frequency", ExpertScore::Frequency}, {"gate-weight", ExpertScore::GateWeight},
            {"easy-ep", ExpertScore::EasyEp}, {"tcess", ExpertScore::Tcess},
            {"reconstruction", ExpertScore::Reconstruction})
MOE_CHOICES(PruneScope, {"layer", PruneScope::Layer}, {"global", PruneScope::Global})
MOE_CHOICES(MergeMethod, {"msmoe", MergeMethod::Msmoe}, {"dern", MergeMethod::Dern})
MOE_CHOICES(MergeSimilarity, {"router-logits", MergeSimilarity::RouterLogits}, {"weights", MergeSimilarity::Weights})
MOE_CHOICES(MergeAlign, {"none", MergeAlign::None}, {"permutation", MergeAlign::Permutation})
MOE_CHOICES(AtomScore, {"camera", AtomScore::Camera}, {"heapr", AtomScore::Heapr}, {"camera-sum", AtomScore::CameraSum},
            {"magnitude", AtomScore::Magnitude})
MOE_CHOICES(QuantizeMethod, {"rtn", QuantizeMethod::Rtn}, {"gptq", QuantizeMethod::Gptq})
MOE_CHOICES(GptqGroupScales, {"running", GptqGroupScales::Running}, {"block", GptqGroupScales::Block},
            {"static", GptqGroupScales::Static})
MOE_CHOICES(GptqPrecision, {"f64", GptqPrecision::F64}, {"f32", GptqPrecision::F32})
MOE_CHOICES(ScaleKind, {"f16", ScaleKind::F16}, {"bf16", ScaleKind::BF16})
MOE_CHOICES(QuantizeFormat, {"group", QuantizeFormat::Group}, {"q4_0", QuantizeFormat::Q4_0},
            {"q4_1", QuantizeFormat::Q4_1}, {"q5_0", QuantizeFormat::Q5_0}, {"q5_1", QuantizeFormat::Q5_1},
            {"q8_0", QuantizeFormat::Q8_0}, {"q2_k", QuantizeFormat::Q2_K}, {"q3_k", QuantizeFormat::Q3_K},
            {"q4_k", QuantizeFormat::Q4_K}, {"q5_k", QuantizeFormat::Q5_K}, {"q6_k", QuantizeFormat::Q6_K})
MOE_CHOICES(QuantizeTarget, {"experts", QuantizeTarget::Experts}, {"shared", QuantizeTarget::Shared},
            {"attention", QuantizeTarget::Attention}, {"dense", QuantizeTarget::Dense}, {"all", QuantizeTarget::All},
            {"lm_head", QuantizeTarget::LmHead}, {"embedding", QuantizeTarget::Embedding})
MOE_CHOICES(Granularity, {"expert", Granularity::Expert}, {"matrix", Granularity::Matrix},
            {"micro-expert", Granularity::MicroExpert}, {"layer", Granularity::Layer})
MOE_CHOICES(AllocationObjective, {"mc-moe", AllocationObjective::McMoe}, {"hessian", AllocationObjective::Hessian})

#undef MOE_CHOICES

} // namespace moe
