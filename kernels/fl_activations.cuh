// fl_activations.cuh: GENERATED from kernels/activations.py by `python -m fusedlinear.kernels.cuda`.
// Do not edit; tests/test_cuda_build.py fails when this file and the table disagree.
// Activation table digest: 3a9df18b4eb46b1c
#pragma once

template <typename T> __host__ __device__ __forceinline__ T where(bool c, T x, T y) { return c ? x : y; }
template <typename T> __host__ __device__ __forceinline__ T sigmoid(T x) { return T(1.0) / (T(1.0) + exp(-x)); }

// a = g_ACT(z); ACT is a compile-time constant, so each instance holds one formula
template <int ACT, typename T> __host__ __device__ __forceinline__ T fl_act_forward(T z, T s)
{
    switch (ACT) {
    case 0: return z;  // identity
    case 1: return where(z <= T(0.0), T(0.0), z);  // relu
    case 2: return sigmoid(z);  // sigmoid
    case 3: return tanh(z);  // tanh
    case 4: return T(0.5) * z * (T(1.0) + erf(z * T(0.7071067811865476)));  // gelu
    case 5: return T(0.5) * z * (T(1.0) + tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z)));  // gelu_tanh
    case 6: return z * sigmoid(z);  // silu
    case 7: return where(z > T(0.0), z, z * s);  // leaky_relu
    case 8: return z * sigmoid(T(1.702) * z);  // quick_gelu
    case 9: return T(0.5) * z * (T(1.0) + tanh(z * T(0.7978845608) * (T(1.0) + T(0.044715) * z * z)));  // gelu_fast
    case 10: return where(z <= T(0.0), T(0.0), where(z >= T(6.0), T(6.0), z));  // relu6
    case 11: return where(z <= T(0.0), T(0.0), z * z);  // relu2
    case 12: return z * where(z + T(3.0) <= T(0.0), T(0.0), where(z + T(3.0) >= T(6.0), T(6.0), z + T(3.0))) / T(6.0);  // hardswish
    case 13: return where(z + T(3.0) <= T(0.0), T(0.0), where(z + T(3.0) >= T(6.0), T(6.0), z + T(3.0))) / T(6.0);  // hardsigmoid
    case 14: return z * tanh(log1p(exp(z)));  // mish
    case 15: return where(z > T(20.0), z, log1p(exp(z)));  // softplus
    }
    return z;
}

// dz = da * g_ACT'(.), v being the saved tensor's element (a or z, as the table says)
template <int ACT, typename T> __host__ __device__ __forceinline__ T fl_act_backward(T da, T v, T s)
{
    switch (ACT) {
    case 0: { return da; }  // identity
    case 1: { const T a = v; return where(a <= T(0.0), T(0.0), da); }  // relu
    case 2: { const T a = v; return da * (T(1.0) - a) * a; }  // sigmoid
    case 3: { const T a = v; return da * (T(1.0) - a * a); }  // tanh
    case 4: { const T z = v; return da * (T(0.5) * (T(1.0) + erf(z * T(0.7071067811865476))) + z * T(0.3989422804014327) * exp(-T(0.5) * z * z)); }  // gelu
    case 5: { const T z = v; return da * (T(0.5) * (T(1.0) + tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z))) + T(0.5) * z * (T(1.0) - tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z)) * tanh(T(0.7978845608028654) * (z + T(0.044715) * z * z * z))) * T(0.7978845608028654) * (T(1.0) + T(3.0) * T(0.044715) * z * z)); }  // gelu_tanh
    case 6: { const T z = v; return da * sigmoid(z) * (T(1.0) + z * (T(1.0) - sigmoid(z))); }  // silu
    case 7: { const T z = v; return where(z > T(0.0), da, da * s); }  // leaky_relu
    case 8: { const T z = v; return da * sigmoid(T(1.702) * z) + da * z * (T(1.0) - sigmoid(T(1.702) * z)) * sigmoid(T(1.702) * z) * T(1.702); }  // quick_gelu
    case 9: { const T z = v; return da * (T(0.5) * (T(1.0) + tanh(z * T(0.7978845608) * (T(1.0) + T(0.044715) * z * z))) + T(0.5) * z * (T(1.0) - tanh(z * T(0.7978845608) * (T(1.0) + T(0.044715) * z * z)) * tanh(z * T(0.7978845608) * (T(1.0) + T(0.044715) * z * z))) * T(0.7978845608) * (T(1.0) + T(0.044715) * T(3.0) * z * z)); }  // gelu_fast
    case 10: { const T a = v; return where(a <= T(0.0), T(0.0), where(a >= T(6.0), T(0.0), da)); }  // relu6
    case 11: { const T z = v; return where(z <= T(0.0), T(0.0), T(2.0) * z * da); }  // relu2
    case 12: { const T z = v; return where(z <= -T(3.0), T(0.0), where(z < T(3.0), da * (z / T(3.0) + T(0.5)), da)); }  // hardswish
    case 13: { const T z = v; return where(z > -T(3.0), where(z < T(3.0), da * T(0.1666666716337204), T(0.0)), T(0.0)); }  // hardsigmoid
    case 14: { const T z = v; return da * (tanh(log1p(exp(z))) + z * sigmoid(z) * (T(1.0) - tanh(log1p(exp(z))) * tanh(log1p(exp(z))))); }  // mish
    case 15: { const T z = v; return where(z > T(20.0), da, da * exp(z) / (exp(z) + T(1.0))); }  // softplus
    }
    return da;
}

// X(activation id, activation name, S, TAG) for every activation of the table
#define FL_FOR_EACH_ACTIVATION(X, S, TAG) \
    X(0, identity, S, TAG) \
    X(1, relu, S, TAG) \
    X(2, sigmoid, S, TAG) \
    X(3, tanh, S, TAG) \
    X(4, gelu, S, TAG) \
    X(5, gelu_tanh, S, TAG) \
    X(6, silu, S, TAG) \
    X(7, leaky_relu, S, TAG) \
    X(8, quick_gelu, S, TAG) \
    X(9, gelu_fast, S, TAG) \
    X(10, relu6, S, TAG) \
    X(11, relu2, S, TAG) \
    X(12, hardswish, S, TAG) \
    X(13, hardsigmoid, S, TAG) \
    X(14, mish, S, TAG) \
    X(15, softplus, S, TAG)
