/* Portable kernels: plain C, popcount by the compiler's builtin. Runs on any CPU. */
#include <stdint.h>

#define BF_ISA scalar
#define BF_PX 1

static void bf_micro(int npx, const uint64_t *x, const int64_t *pixel_offsets,
                     const int64_t *word_offsets, int64_t n_words, const uint64_t *w,
                     int32_t *acc) {
    for (int p = 0; p < npx; p++) {
        int64_t sums[64] = {0};
        const uint64_t *xp = x + pixel_offsets[p];
        for (int64_t i = 0; i < n_words; i++) {
            const uint64_t a = xp[word_offsets[i]];
            const uint64_t *wr = w + i * 64;
            for (int j = 0; j < 64; j++) sums[j] += __builtin_popcountll(a ^ wr[j]);
        }
        for (int j = 0; j < 64; j++) acc[p * 64 + j] = (int32_t)sums[j];
    }
}

#include "kernel_body.h"
