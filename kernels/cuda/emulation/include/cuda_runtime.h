// The CPU emulation of CUDA (../CudaEmulation.h) under the runtime header's name.
#include "../CudaEmulation.h"
