/* Portable kernels: plain C, popcount by the compiler's builtin. Runs on any CPU. */
#include <stdint.h>

#define BF_ISA scalar
#define BF_PX 1

static void bf_micro(int npx, const uint64_t *x, const int64_t *pixel_offsets,
                     const int64_t *tap_offsets, int64_t n_taps, int64_t cin_words,
                     const uint64_t *w, int32_t *acc) {
    for (int p = 0; p < npx; p++) {
        int64_t sums[64] = {0};
        for (int64_t t = 0; t < n_taps; t++) {
            const uint64_t *xs = x + pixel_offsets[p] + tap_offsets[t];
            const uint64_t *wt = w + t * cin_words * 64;
            for (int64_t c = 0; c < cin_words; c++) {
                const uint64_t a = xs[c];
                const uint64_t *wr = wt + c * 64;
                for (int j = 0; j < 64; j++) sums[j] += __builtin_popcountll(a ^ wr[j]);
            }
        }
        for (int j = 0; j < 64; j++) acc[p * 64 + j] = (int32_t)sums[j];
    }
}

#include "kernel_body.h"
