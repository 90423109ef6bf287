// fl_elementwise.cu — the element-wise CUDA kernels of the default ("vendor") engine.
//
// The GEMMs of a fused layer run in cuBLAS/cuBLASLt through PyTorch (addmm, mm); what is left is
// element-wise, and each piece is one pass over memory here:
//   forward   A = g(Z)                      fl_act_forward_<act>_<dtype>   (Z = addmm(b, X, Wᵀ))
//   backward  dZ = dA ⊙ g'(A or Z)  and     fl_grad_<act>_<dtype>          (one pass, one launch)
//             db = Σ_rows dZ
// then dX = dZ W and dW = dZᵀ X as GEMMs.
//
// Loaded by kernels/cuda.py with cupy.RawModule (NVRTC; this file and its headers inlined into one
// source text, so CuPy's disk cache key covers every line); compiled by nvcc in the tests for
// register/spill reports, and by g++ in the CPU emulation harness (tests/cuda_emu/driver.cpp),
// which launches the kernels with the same plans (kernels/cuda.py) as the GPU path.
//
// The activation is a template parameter (a compile-time constant: each kernel holds one formula);
// the extern "C" names make the kernels retrievable without NVRTC name expressions (with those,
// CuPy 13.0-14.0 skip their disk cache). Storage types: fl_types.cuh; float16/bfloat16 compute in
// float, as PyTorch. All index arithmetic is 64-bit. No atomics: every sum has a fixed order.

#include "fl_types.cuh"
#include "fl_activations.cuh"

typedef long long i64;

// a[i] = g(z[i]) over `count` contiguous elements; a == z is allowed (in place: each thread reads
// its element before writing it), hence no __restrict__. When both addresses are multiples of 16
// (always so for PyTorch's fresh allocations; a view may not be) the first count - count % V
// elements move as 16-byte vectors of V = fl_vec<S>::N, each thread taking whole vectors; the
// rest, or everything when unaligned, one element at a time. The condition is the same for every
// thread of the launch, and both ways compute each element by the same formula.
template <int ACT, typename S>
__device__ __forceinline__ void fl_act_forward_body(S* a, const S* z, i64 count, double slope)
{
    typedef typename fl_num<S>::C C;
    constexpr int V = fl_vec<S>::N;
    const C s = (C)slope;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    const i64 first = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    i64 done = 0;
    if (fl_aligned16(a) && fl_aligned16(z)) {
        const i64 vectors = count / V;
        for (i64 i = first; i < vectors; i += stride) {
            fl_vec<S> v = fl_load16(z + i * V);
#pragma unroll
            for (int j = 0; j < V; ++j)
                v.v[j] = fl_num<S>::store(fl_act_forward<ACT, C>(fl_num<S>::load(v.v[j]), s));
            fl_store16(a + i * V, v);
        }
        done = vectors * V;
    }
    for (i64 i = done + first; i < count; i += stride)
        a[i] = fl_num<S>::store(fl_act_forward<ACT, C>(fl_num<S>::load(z[i]), s));
}

// One dZ element: dA ⊙ g'(v) (v: the saved element, 0 if none), rounded to S; added to the
// column's sum as that rounded value.
template <int ACT, typename S>
__device__ __forceinline__ S fl_grad_one(S da, typename fl_num<S>::C v, typename fl_num<S>::C s,
                                         typename fl_num<S>::C& acc)
{
    typedef typename fl_num<S>::C C;
    const S q = fl_num<S>::store(fl_act_backward<ACT, C>(fl_num<S>::load(da), v, s));
    acc += fl_num<S>::load(q);
    return q;
}

// One launch, one pass over dA (M, N; element (m, n) at m * sdm + n * sdn, either stride may be
// 0: an expanded gradient is read in place) and the saved A or Z (M, N contiguous; null if the
// activation saves nothing). A block per FL_GRAD_COLS columns (grid x = column groups), of
// FL_GRAD_COLS / V threads (threadIdx.x; each owns V = fl_vec<S>::N consecutive columns, 16 bytes)
// x blockDim.y row lanes (a power of two; kernels/tiling.py cuda_grad_grid); every block walks
// all M rows of its columns, lane y taking rows y, y + blockDim.y, ... in order:
//     dz[m, n] = dA[m, n] ⊙ g'(saved[m, n])         (rounded to S; not stored if dz is null)
//     acc[n]  += that rounded dz                     (in C: float for 16-bit types)
// then, if db is wanted, the lanes' sums of each column are added in a fixed tree through shared
// memory (lane y + h into lane y for h = lanes/2, ..., 1): the same order in every run
// (deterministic, no atomics) and no second launch.
// A thread's V columns move as one 16-byte vector per row when dA's rows are contiguous (sdn == 1)
// and every row of dA, saved and dz starts at a multiple of 16 bytes (N and sdm multiples of V,
// aligned base addresses): the same for every thread of the launch. Otherwise element by element,
// the same values in the same order, so the result does not depend on which way ran. The row
// loops are unrolled 4 times, so a thread has several rows' loads in flight (a narrow gradient,
// N = 10 say, is one block walking every row).
template <int ACT, typename S>
__device__ __forceinline__ void fl_grad_body(S* __restrict__ dz, S* __restrict__ db, const S* __restrict__ da,
                                             const S* __restrict__ saved, i64 M, i64 N, i64 sdm, i64 sdn,
                                             double slope)
{
    typedef typename fl_num<S>::C C;
    constexpr int V = fl_vec<S>::N;
    // at most FL_GRAD_THREADS threads: lanes x (FL_GRAD_COLS / V) threads across
    __shared__ C lane_sums[FL_GRAD_THREADS * V / FL_GRAD_COLS][FL_GRAD_COLS];
    const unsigned col = threadIdx.x * V;  // this thread's first column within the block's
    const i64 n0 = (i64)blockIdx.x * FL_GRAD_COLS + col;
    const C s = (C)slope;
    C acc[V];
#pragma unroll
    for (int j = 0; j < V; ++j)
        acc[j] = C(0);
    const bool vectors = sdn == 1 && sdm % V == 0 && N % V == 0 && fl_aligned16(da) && fl_aligned16(saved)
                         && fl_aligned16(dz);
    if (n0 < N && vectors) {
#pragma unroll 4
        for (i64 m = threadIdx.y; m < M; m += blockDim.y) {
            const fl_vec<S> g = fl_load16(da + m * sdm + n0);
            fl_vec<S> v, q;
            if (saved)
                v = fl_load16(saved + m * N + n0);
#pragma unroll
            for (int j = 0; j < V; ++j)
                q.v[j] = fl_grad_one<ACT, S>(g.v[j], saved ? fl_num<S>::load(v.v[j]) : C(0), s, acc[j]);
            if (dz)
                fl_store16(dz + m * N + n0, q);
        }
    } else if (n0 < N) {
#pragma unroll 4
        for (i64 m = threadIdx.y; m < M; m += blockDim.y) {
#pragma unroll
            for (int j = 0; j < V; ++j) {
                const i64 n = n0 + j;
                if (n < N) {
                    const S q = fl_grad_one<ACT, S>(da[m * sdm + n * sdn],
                                                    saved ? fl_num<S>::load(saved[m * N + n]) : C(0), s, acc[j]);
                    if (dz)
                        dz[m * N + n] = q;
                }
            }
        }
    }
    if (!db)  // the same for every thread of the launch: no thread skips the barrier alone
        return;
#pragma unroll
    for (int j = 0; j < V; ++j)
        lane_sums[threadIdx.y][col + j] = acc[j];
    __syncthreads();
    for (unsigned half = blockDim.y / 2; half > 0; half /= 2) {  // every thread passes every barrier
        if (threadIdx.y < half) {
#pragma unroll
            for (int j = 0; j < V; ++j)
                lane_sums[threadIdx.y][col + j] += lane_sums[threadIdx.y + half][col + j];
        }
        __syncthreads();
    }
    if (threadIdx.y == 0) {
#pragma unroll
        for (int j = 0; j < V; ++j)
            if (n0 + j < N)
                db[n0 + j] = fl_num<S>::store(lane_sums[0][col + j]);
    }
}

// Every (activation, storage type) instance: X(ACT_ID, act_name, S, dtype_tag).
#define FL_ELEMENTWISE_INSTANCES(X)                                                                \
    FL_FOR_EACH_ACTIVATION(X, fl_f16, f16)                                                         \
    FL_FOR_EACH_ACTIVATION(X, fl_bf16, bf16)                                                       \
    FL_FOR_EACH_ACTIVATION(X, float, f32)                                                          \
    FL_FOR_EACH_ACTIVATION(X, double, f64)

// The most threads a grad block has (kernels/tiling.py cuda_grad_grid): __launch_bounds__ makes the
// compiler keep each instance's registers within what such a block may use (64 K per SM), whatever
// NVRTC version compiles this, so a launch never fails for resources (1 block per SM at least: no
// tighter cap than that, which made the float64 GELU instance spill).
#define FL_GRAD_BOUND_f16 FL_GRAD_THREADS
#define FL_GRAD_BOUND_bf16 FL_GRAD_THREADS
#define FL_GRAD_BOUND_f32 FL_GRAD_THREADS
#define FL_GRAD_BOUND_f64 FL_GRAD_THREADS_F64

#define FL_EW_KERNELS(ID, NAME, S, TAG)                                                            \
    extern "C" __global__ void fl_act_forward_##NAME##_##TAG(S* a, const S* z, i64 count, double slope) \
    {                                                                                              \
        fl_act_forward_body<ID, S>(a, z, count, slope);                                            \
    }                                                                                              \
    extern "C" __global__ void __launch_bounds__(FL_GRAD_BOUND_##TAG, 1)                           \
        fl_grad_##NAME##_##TAG(S* dz, S* db, const S* da, const S* saved, i64 M, i64 N,             \
                               i64 sdm, i64 sdn, double slope)                                     \
    {                                                                                              \
        fl_grad_body<ID, S>(dz, db, da, saved, M, N, sdm, sdn, slope);                             \
    }
FL_ELEMENTWISE_INSTANCES(FL_EW_KERNELS)
