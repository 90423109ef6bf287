// racy_main.cpp — runs rotate_left<SYNC> over 3 blocks of 64 threads and checks the result.
#include "emu.h"
#include "racy.cu"

int main()
{
    const long long n = 192;
    std::vector<float> in(n), out(n);
    for (long long i = 0; i < n; ++i)
        in[i] = (float)i;
    float *o = out.data(), *p = in.data();
    emu_launch({3, 1, 1}, {64, 1, 1}, [=] { rotate_left<RACY_SYNC>(o, p, n); });
    for (long long i = 0; i < n; ++i) {
        const long long expect = (i / 64) * 64 + (i % 64 + 1) % 64;
        if (out[i] != (float)expect) {
            std::fprintf(stderr, "mismatch at %lld\n", i);
            return 1;
        }
    }
    return 0;
}
