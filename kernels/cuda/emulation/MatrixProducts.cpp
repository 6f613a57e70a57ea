// MatrixProducts.cu compiled as C++ for the CPU emulation of CUDA (CudaEmulation.h).
#include "../MatrixProducts.cu"
