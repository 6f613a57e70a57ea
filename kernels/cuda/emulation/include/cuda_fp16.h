// The CPU emulation of CUDA (../CudaEmulation.h) under the fp16 header's name.
#include "../CudaEmulation.h"
