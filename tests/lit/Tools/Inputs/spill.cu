// A kernel that spills: at most 32 registers a thread (1024 threads, two
// blocks a multiprocessor) and 64 values live at once.
__global__ void __launch_bounds__(1024, 2) spiller(const float *in, float *out) {
  float v[64];
#pragma unroll
  for (int i = 0; i < 64; ++i)
    v[i] = in[threadIdx.x * 64 + i] * (i + 1);
  float s = 0;
#pragma unroll
  for (int i = 0; i < 64; ++i)
#pragma unroll
    for (int j = 0; j < 64; ++j)
      s += v[i] * v[(i * 7 + j) & 63];
  out[threadIdx.x] = s + v[threadIdx.x & 63];
}
