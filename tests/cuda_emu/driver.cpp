// driver.cpp — executes launch plans of fusedlinear.kernels.cuda on the CPU through emu.h.
//
// Plan file, one directive a line:
//   buffer NAME f16|bf16|f32|f64 COUNT PATH|- [OFFSET]
//                                             load COUNT elements from PATH (- = zeros); the first
//                                             element at OFFSET bytes (0-15) past a multiple of 16,
//                                             as the tensor's address is (the kernels' 16-byte
//                                             accesses depend on it)
//   alias NAME OTHER                          NAME is the same memory as buffer OTHER (in place)
//   launch KERNEL GX GY GZ BX BY BZ ARG...    ARG: p:NAME | p:- (null) | i:INT | d:REAL
//   output NAME PATH                          write the buffer to PATH after all launches
//   roundtrip f16|bf16 COUNT IN OUT           float32 -> storage type -> float32 (conversion test)
// KERNEL is the extern "C" name the CuPy launcher fetches. Each buffer is its own heap block, so
// ASan sees any access past its end (and before its start, unless OFFSET > 0); a pointer
// argument's element size must match its buffer's.
#include "emu.h"
#include "fl_elementwise.cu"
#include "fused_linear.cu"

#include <fstream>
#include <functional>
#include <map>
#include <cstring>
#include <memory>
#include <new>
#include <sstream>
#include <string>

struct Buffer {
    unsigned char* base = nullptr;  // 16-byte aligned heap block of offset + size bytes
    unsigned char* data = nullptr;  // base + offset: the first element
    size_t size = 0, elem = 0;
    Buffer(size_t bytes, size_t offset, size_t elem_)
        : base(static_cast<unsigned char*>(::operator new(offset + bytes, std::align_val_t(16)))),
          data(base + offset), size(bytes), elem(elem_)
    {
        std::memset(base, 0, offset + bytes);
    }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    ~Buffer() { ::operator delete(base, std::align_val_t(16)); }
};

static std::map<std::string, std::shared_ptr<Buffer>> buffers;

static size_t elem_size(const std::string& tag)
{
    if (tag == "f16" || tag == "bf16")
        return 2;
    if (tag == "f32")
        return 4;
    if (tag == "f64")
        return 8;
    std::fprintf(stderr, "unknown dtype %s\n", tag.c_str());
    std::exit(2);
}

struct Args {
    std::vector<std::string> tokens;
    size_t at = 0;
    std::string next(char kind)
    {
        if (at >= tokens.size() || tokens[at].size() < 2 || tokens[at][0] != kind || tokens[at][1] != ':') {
            std::fprintf(stderr, "bad argument %zu: expected %c:...\n", at, kind);
            std::exit(2);
        }
        return tokens[at++].substr(2);
    }
    template <class T> T* ptr()
    {
        std::string name = next('p');
        if (name == "-")
            return nullptr;
        auto it = buffers.find(name);
        if (it == buffers.end()) {
            std::fprintf(stderr, "unknown buffer %s\n", name.c_str());
            std::exit(2);
        }
        if (it->second->elem != sizeof(T)) {
            std::fprintf(stderr, "buffer %s has %zu-byte elements, the kernel takes %zu\n", name.c_str(),
                         it->second->elem, sizeof(T));
            std::exit(2);
        }
        return reinterpret_cast<T*>(it->second->data);
    }
    long long i64() { return std::stoll(next('i')); }
    double f64() { return std::stod(next('d')); }
    void done()
    {
        if (at != tokens.size()) {
            std::fprintf(stderr, "%zu arguments, the kernel takes %zu\n", tokens.size(), at);
            std::exit(2);
        }
    }
};

using Runner = std::function<void(dim3, dim3, Args&)>;

static std::map<std::string, Runner> runners()
{
    std::map<std::string, Runner> r;
#define EMU_EW(ID, NAME, S, TAG)                                                                   \
    r["fl_act_forward_" #NAME "_" #TAG] = [](dim3 g, dim3 b, Args& a) {                            \
        S* out = a.ptr<S>();                                                                       \
        const S* z = a.ptr<S>();                                                                   \
        long long count = a.i64();                                                                 \
        double slope = a.f64();                                                                    \
        a.done();                                                                                  \
        emu_launch(g, b, [=] { fl_act_forward_##NAME##_##TAG(out, z, count, slope); });            \
    };                                                                                             \
    r["fl_grad_" #NAME "_" #TAG] = [](dim3 g, dim3 b, Args& a) {                                   \
        S* dz = a.ptr<S>();                                                                        \
        S* db = a.ptr<S>();                                                                        \
        const S* da = a.ptr<S>();                                                                  \
        const S* saved = a.ptr<S>();                                                               \
        long long M = a.i64(), N = a.i64(), sdm = a.i64(), sdn = a.i64();                          \
        double slope = a.f64();                                                                    \
        a.done();                                                                                  \
        emu_launch(g, b, [=] { fl_grad_##NAME##_##TAG(dz, db, da, saved, M, N, sdm, sdn, slope); }); \
    };
    FL_ELEMENTWISE_INSTANCES(EMU_EW)
#define EMU_GEMM_FORWARD(ID, NAME, T, TAG)                                                         \
    r["fl_gemm_forward_" #NAME "_" #TAG] = [](dim3 g, dim3 b, Args& a) {                           \
        T *C = a.ptr<T>(), *Z = a.ptr<T>();                                                        \
        const T *A = a.ptr<T>(), *B = a.ptr<T>(), *bias = a.ptr<T>();                              \
        long long M = a.i64(), N = a.i64(), K = a.i64(), lda = a.i64(), ldb = a.i64(), ldc = a.i64(); \
        double slope = a.f64();                                                                    \
        a.done();                                                                                  \
        emu_launch(g, b, [=] { fl_gemm_forward_##NAME##_##TAG(C, Z, A, B, bias, M, N, K, lda, ldb, ldc, slope); }); \
    };
    FL_GEMM_FORWARD_INSTANCES(EMU_GEMM_FORWARD)
#define EMU_GEMM_PLAIN(T, TAG)                                                                     \
    r["fl_gemm_nn_" #TAG] = [](dim3 g, dim3 b, Args& a) {                                          \
        T* C = a.ptr<T>();                                                                         \
        const T *A = a.ptr<T>(), *B = a.ptr<T>();                                                  \
        long long M = a.i64(), N = a.i64(), K = a.i64(), lda = a.i64(), ldb = a.i64(), ldc = a.i64(); \
        a.done();                                                                                  \
        emu_launch(g, b, [=] { fl_gemm_nn_##TAG(C, A, B, M, N, K, lda, ldb, ldc); });              \
    };                                                                                             \
    r["fl_gemm_tn_" #TAG] = [](dim3 g, dim3 b, Args& a) {                                          \
        T* C = a.ptr<T>();                                                                         \
        const T *A = a.ptr<T>(), *B = a.ptr<T>();                                                  \
        long long M = a.i64(), N = a.i64(), K = a.i64(), lda = a.i64(), ldb = a.i64(), ldc = a.i64(); \
        a.done();                                                                                  \
        emu_launch(g, b, [=] { fl_gemm_tn_##TAG(C, A, B, M, N, K, lda, ldb, ldc); });              \
    };
    FL_GEMM_PLAIN_INSTANCES(EMU_GEMM_PLAIN)
    return r;
}

static int roundtrip(const std::string& tag, size_t count, const std::string& in, const std::string& out)
{
    std::vector<float> v(count);
    std::ifstream f(in, std::ios::binary);
    f.read(reinterpret_cast<char*>(v.data()), (std::streamsize)(count * sizeof(float)));
    if (!f)
        return 2;
    for (auto& x : v)
        x = tag == "f16" ? fl_half_to_float(fl_float_to_half(x)) : fl_bf16_to_float(fl_float_to_bf16(x));
    std::ofstream o(out, std::ios::binary);
    o.write(reinterpret_cast<const char*>(v.data()), (std::streamsize)(count * sizeof(float)));
    return 0;
}

int main(int argc, char** argv)
{
    if (argc != 2) {
        std::fprintf(stderr, "usage: %s PLAN\n", argv[0]);
        return 2;
    }
    auto table = runners();
    std::ifstream plan(argv[1]);
    std::string line;
    while (std::getline(plan, line)) {
        std::istringstream in(line);
        std::string directive;
        in >> directive;
        if (directive == "buffer") {
            std::string name, dtype, path;
            size_t count, offset = 0;
            in >> name >> dtype >> count >> path;
            if (!(in >> offset))
                offset = 0;
            if (offset > 15) {
                std::fprintf(stderr, "buffer %s: offset %zu is not in 0..15\n", name.c_str(), offset);
                return 2;
            }
            const size_t elem = elem_size(dtype);
            auto buf = std::make_shared<Buffer>(count * elem, offset, elem);
            if (path != "-") {
                std::ifstream f(path, std::ios::binary);
                f.read(reinterpret_cast<char*>(buf->data), (std::streamsize)buf->size);
                if (!f) {
                    std::fprintf(stderr, "short read of %s\n", path.c_str());
                    return 2;
                }
            }
            buffers[name] = buf;
        } else if (directive == "alias") {
            std::string name, other;
            in >> name >> other;
            buffers[name] = buffers.at(other);
        } else if (directive == "launch") {
            std::string kernel;
            dim3 g, b;
            in >> kernel >> g.x >> g.y >> g.z >> b.x >> b.y >> b.z;
            Args args;
            std::string tok;
            while (in >> tok)
                args.tokens.push_back(tok);
            auto it = table.find(kernel);
            if (it == table.end()) {
                std::fprintf(stderr, "unknown kernel %s\n", kernel.c_str());
                return 2;
            }
            it->second(g, b, args);
        } else if (directive == "output") {
            std::string name, path;
            in >> name >> path;
            std::ofstream f(path, std::ios::binary);
            auto& buf = *buffers.at(name);
            f.write(reinterpret_cast<const char*>(buf.data), (std::streamsize)buf.size);
        } else if (directive == "roundtrip") {
            std::string tag, src, dst;
            size_t count;
            in >> tag >> count >> src >> dst;
            if (int rc = roundtrip(tag, count, src, dst))
                return rc;
        }
    }
    return 0;
}
