/* x86-64 AVX-512 with VPOPCNTDQ: one 512-bit popcount covers 8 output channels.
 *
 * Three output pixels share every weight load: 24 zmm accumulators (3 pixels x 64 channels),
 * 3 broadcast input words and one weight register fit in the 32 zmm registers, so the inner
 * loop is loads + VPXORQ + VPOPCNTQ + VPADDQ with nothing spilled. */
#include <immintrin.h>
#include <stdint.h>

#define BF_ISA avx512
#define BF_PX 3

static inline __attribute__((always_inline)) void bf_micro_n(
    const int npx, const uint64_t *x, const int64_t *pixel_offsets, const int64_t *tap_offsets,
    int64_t n_taps, int64_t cin_words, const uint64_t *w, int32_t *acc) {
    __m512i sums[BF_PX][8];
    for (int p = 0; p < npx; p++)
        for (int k = 0; k < 8; k++) sums[p][k] = _mm512_setzero_si512();
    for (int64_t t = 0; t < n_taps; t++) {
        const uint64_t *xs[BF_PX];
        for (int p = 0; p < npx; p++) xs[p] = x + pixel_offsets[p] + tap_offsets[t];
        const uint64_t *wt = w + t * cin_words * 64;
        for (int64_t c = 0; c < cin_words; c++) {
            __m512i a[BF_PX];
            for (int p = 0; p < npx; p++) a[p] = _mm512_set1_epi64((long long)xs[p][c]);
            const uint64_t *wr = wt + c * 64;
            for (int k = 0; k < 8; k++) {
                const __m512i wk = _mm512_loadu_si512((const void *)(wr + 8 * k));
                for (int p = 0; p < npx; p++)
                    sums[p][k] = _mm512_add_epi64(
                        sums[p][k], _mm512_popcnt_epi64(_mm512_xor_si512(a[p], wk)));
            }
        }
    }
    for (int p = 0; p < npx; p++)
        for (int k = 0; k < 8; k++)
            _mm256_storeu_si256((__m256i *)(acc + p * 64 + 8 * k),
                                _mm512_cvtepi64_epi32(sums[p][k]));
}

static void bf_micro(int npx, const uint64_t *x, const int64_t *pixel_offsets,
                     const int64_t *tap_offsets, int64_t n_taps, int64_t cin_words,
                     const uint64_t *w, int32_t *acc) {
    /* constant pixel counts, so each copy is fully unrolled with its accumulators in registers */
    switch (npx) {
    case 3: bf_micro_n(3, x, pixel_offsets, tap_offsets, n_taps, cin_words, w, acc); break;
    case 2: bf_micro_n(2, x, pixel_offsets, tap_offsets, n_taps, cin_words, w, acc); break;
    default: bf_micro_n(1, x, pixel_offsets, tap_offsets, n_taps, cin_words, w, acc); break;
    }
}

#include "kernel_body.h"
