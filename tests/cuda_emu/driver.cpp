// driver.cpp — executes a launch plan of fusedlinear.kernels.cuda on the CPU through emu.h.
//
// Plan file, one directive a line:
//   buffer NAME f32|f64 COUNT PATH|-      load COUNT elements from PATH (- = zeros)
//   launch KERNEL GX GY GZ BX BY BZ ARG…  ARG: p:NAME | p:- (null) | i:INT | n:INT | t:REAL
//   output NAME PATH                      write the buffer to PATH after all launches
// KERNEL is the name expression the CuPy launcher uses, spaces removed: fl_gemm<float,false,true>.
#include "emu.h"
#include KERNEL_SOURCE

#include <cstdlib>
#include <fstream>
#include <functional>
#include <map>
#include <sstream>
#include <string>

struct Buffer {
    std::vector<unsigned char> bytes;
};

static std::map<std::string, Buffer> buffers;

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
        return reinterpret_cast<T*>(it->second.bytes.data());
    }
    long long i64() { return std::stoll(next('i')); }
    int n() { return std::stoi(next('n')); }
    double t() { return std::stod(next('t')); }
};

using Runner = std::function<void(dim3, dim3, Args&)>;

template <class T, bool TA, bool TB> static Runner gemm()
{
    return [](dim3 g, dim3 b, Args& a) {
        T *C = a.ptr<T>(), *Z = a.ptr<T>(), *A = a.ptr<T>(), *B = a.ptr<T>(), *bias = a.ptr<T>();
        long long M = a.i64(), N = a.i64(), K = a.i64(), lda = a.i64(), ldb = a.i64(), ldc = a.i64();
        int act = a.n();
        T slope = (T)a.t();
        emu_launch(g, b, [=] { fl_gemm<T, TA, TB>(C, Z, A, B, bias, M, N, K, lda, ldb, ldc, act, slope); });
    };
}

template <class T> static Runner grad_z()
{
    return [](dim3 g, dim3 b, Args& a) {
        T *dz = a.ptr<T>(), *da = a.ptr<T>(), *saved = a.ptr<T>();
        long long count = a.i64();
        int act = a.n();
        T slope = (T)a.t();
        emu_launch(g, b, [=] { fl_grad_z<T>(dz, da, saved, count, act, slope); });
    };
}

template <class T> static Runner column_sum()
{
    return [](dim3 g, dim3 b, Args& a) {
        T *out = a.ptr<T>(), *x = a.ptr<T>();
        long long M = a.i64(), N = a.i64(), rows = a.i64();
        emu_launch(g, b, [=] { fl_column_sum<T>(out, x, M, N, rows); });
    };
}

#ifdef EXTRA_KERNELS
EXTRA_KERNELS
#endif

static std::map<std::string, Runner> runners()
{
    std::map<std::string, Runner> r;
#ifndef NO_FUSED_LINEAR_KERNELS
    r["fl_gemm<float,false,true>"] = gemm<float, false, true>();
    r["fl_gemm<float,false,false>"] = gemm<float, false, false>();
    r["fl_gemm<float,true,false>"] = gemm<float, true, false>();
    r["fl_gemm<double,false,true>"] = gemm<double, false, true>();
    r["fl_gemm<double,false,false>"] = gemm<double, false, false>();
    r["fl_gemm<double,true,false>"] = gemm<double, true, false>();
    r["fl_grad_z<float>"] = grad_z<float>();
    r["fl_grad_z<double>"] = grad_z<double>();
    r["fl_column_sum<float>"] = column_sum<float>();
    r["fl_column_sum<double>"] = column_sum<double>();
#endif
#ifdef EXTRA_RUNNERS
    EXTRA_RUNNERS
#endif
    return r;
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
            size_t count;
            in >> name >> dtype >> count >> path;
            Buffer buf;
            buf.bytes.assign(count * (dtype == "f32" ? 4 : 8), 0);
            if (path != "-") {
                std::ifstream f(path, std::ios::binary);
                f.read(reinterpret_cast<char*>(buf.bytes.data()), (std::streamsize)buf.bytes.size());
                if (!f) {
                    std::fprintf(stderr, "short read of %s\n", path.c_str());
                    return 2;
                }
            }
            buffers[name] = std::move(buf);
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
            auto& bytes = buffers.at(name).bytes;
            f.write(reinterpret_cast<const char*>(bytes.data()), (std::streamsize)bytes.size());
        }
    }
    return 0;
}
