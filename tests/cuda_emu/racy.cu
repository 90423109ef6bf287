// racy.cu — proves the harness catches a missing __syncthreads (tests/test_cuda_emulation.py).
// Each thread stores its element in shared memory and reads its neighbour's: without the
// barrier that read races with the neighbour's store.
template <bool SYNC>
__global__ void rotate_left(float* out, const float* in, long long n)
{
    __shared__ float tile[64];
    const int t = threadIdx.x;
    const long long i = (long long)blockIdx.x * 64 + t;
    tile[t] = i < n ? in[i] : 0.0f;
    if (SYNC)
        __syncthreads();
    if (i < n)
        out[i] = tile[(t + 1) % 64];
}
