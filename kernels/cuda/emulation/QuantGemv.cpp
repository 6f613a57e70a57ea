// QuantGemv.cu compiled as C++ for the CPU emulation of CUDA (CudaEmulation.h).
#include "../QuantGemv.cu"
