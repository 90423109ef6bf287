// fl_elementwise.cu — the element-wise CUDA kernels of the default ("vendor") engine.
//
// The GEMMs of a fused layer run in cuBLAS/cuBLASLt through PyTorch (addmm, mm); what is left is
// element-wise, and each piece is one pass over memory here:
//   forward   A = g(Z)                      fl_act_forward_<act>_<dtype>   (Z = addmm(b, X, Wᵀ))
//   backward  dZ = dA ⊙ g'(A or Z)  and     fl_grad_<act>_<dtype>          (one pass, both)
//             db's column partial sums
//             db = Σ partial sums           fl_bias_finish_<dtype>         (only if > 1 row chunk)
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
// its element before writing it), hence no __restrict__.
template <int ACT, typename S>
__device__ __forceinline__ void fl_act_forward_body(S* a, const S* z, i64 count, double slope)
{
    typedef typename fl_num<S>::C C;
    const C s = (C)slope;
    const i64 stride = (i64)gridDim.x * blockDim.x;
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < count; i += stride)
        a[i] = fl_num<S>::store(fl_act_forward<ACT, C>(fl_num<S>::load(z[i]), s));
}

// One pass over dA (M, N; row stride ldda) and the saved A or Z (M, N contiguous; null if the
// activation saves nothing). Thread = column n (blockIdx.x * blockDim.x + threadIdx.x), block row
// = chunk c of `rows` rows (blockIdx.y): for each row m of the chunk, in order,
//     dz[m, n] = dA[m, n] ⊙ g'(saved[m, n])         (rounded to S; not stored if dz is null)
//     acc     += that rounded dz                     (in C: float for 16-bit types)
// then, with one chunk, db[n] = acc; with several, partial[c, n] = acc (C) for fl_bias_finish.
// Consecutive threads read consecutive columns of a row: coalesced.
template <int ACT, typename S>
__device__ __forceinline__ void fl_grad_body(S* __restrict__ dz, typename fl_num<S>::C* __restrict__ partial,
                                             S* __restrict__ db, const S* __restrict__ da,
                                             const S* __restrict__ saved, i64 M, i64 N, i64 ldda, i64 rows,
                                             double slope)
{
    typedef typename fl_num<S>::C C;
    const i64 n = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N)
        return;
    const C s = (C)slope;
    const i64 begin = (i64)blockIdx.y * rows;
    const i64 end = begin + rows < M ? begin + rows : M;
    C acc = C(0);
    for (i64 m = begin; m < end; ++m) {
        const C v = saved ? fl_num<S>::load(saved[m * N + n]) : C(0);
        const S q = fl_num<S>::store(fl_act_backward<ACT, C>(fl_num<S>::load(da[m * ldda + n]), v, s));
        if (dz)
            dz[m * N + n] = q;
        acc += fl_num<S>::load(q);
    }
    if (db)
        db[n] = fl_num<S>::store(acc);
    else if (partial)
        partial[(i64)blockIdx.y * N + n] = acc;
}

// db[n] = Σ_c partial[c, n] over `chunks` rows of partial sums, in order; one thread per column.
template <typename S>
__device__ __forceinline__ void fl_bias_finish_body(S* __restrict__ db, const typename fl_num<S>::C* __restrict__ partial,
                                                    i64 chunks, i64 N)
{
    typedef typename fl_num<S>::C C;
    const i64 n = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= N)
        return;
    C acc = C(0);
    for (i64 c = 0; c < chunks; ++c)
        acc += partial[c * N + n];
    db[n] = fl_num<S>::store(acc);
}

// Every (activation, storage type) instance: X(ACT_ID, act_name, S, dtype_tag).
#define FL_ELEMENTWISE_INSTANCES(X)                                                                \
    FL_FOR_EACH_ACTIVATION(X, fl_f16, f16)                                                         \
    FL_FOR_EACH_ACTIVATION(X, fl_bf16, bf16)                                                       \
    FL_FOR_EACH_ACTIVATION(X, float, f32)                                                          \
    FL_FOR_EACH_ACTIVATION(X, double, f64)
#define FL_DTYPE_INSTANCES(X) X(fl_f16, f16) X(fl_bf16, bf16) X(float, f32) X(double, f64)

#define FL_EW_KERNELS(ID, NAME, S, TAG)                                                            \
    extern "C" __global__ void fl_act_forward_##NAME##_##TAG(S* a, const S* z, i64 count, double slope) \
    {                                                                                              \
        fl_act_forward_body<ID, S>(a, z, count, slope);                                            \
    }                                                                                              \
    extern "C" __global__ void fl_grad_##NAME##_##TAG(S* dz, fl_num<S>::C* partial, S* db, const S* da, \
                                                      const S* saved, i64 M, i64 N, i64 ldda, i64 rows, \
                                                      double slope)                                \
    {                                                                                              \
        fl_grad_body<ID, S>(dz, partial, db, da, saved, M, N, ldda, rows, slope);                  \
    }
FL_ELEMENTWISE_INSTANCES(FL_EW_KERNELS)

#define FL_FINISH_KERNEL(S, TAG)                                                                   \
    extern "C" __global__ void fl_bias_finish_##TAG(S* db, const fl_num<S>::C* partial, i64 chunks, i64 N) \
    {                                                                                              \
        fl_bias_finish_body<S>(db, partial, chunks, N);                                            \
    }
FL_DTYPE_INSTANCES(FL_FINISH_KERNEL)
