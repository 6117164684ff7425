/* x86-64 AVX2: popcount by nibble lookup (VPSHUFB), byte counts summed with VPSADBW.
 *
 * AVX2 has no vector popcount. Each byte of a ymm register counts its set bits through a
 * 16-entry table per nibble; the byte counts (at most 8 per step) accumulate for up to 31
 * steps before VPSADBW widens them into 64-bit lanes. A 64-channel block is done as two
 * halves of 32 channels, so the 8 byte accumulators of a half stay in registers. */
#include <immintrin.h>
#include <stdint.h>

#define BF_ISA avx2
#define BF_PX 1

static void bf_micro(int npx, const uint64_t *x, const int64_t *pixel_offsets,
                     const int64_t *word_offsets, int64_t n_words, const uint64_t *w,
                     int32_t *acc) {
    const __m256i table = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1,
                                           1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
    const __m256i low_nibbles = _mm256_set1_epi8(0x0f);
    const __m256i zero = _mm256_setzero_si256();
    for (int p = 0; p < npx; p++) {
        for (int half = 0; half < 2; half++) {
            __m256i wide[8], bytes[8];
            for (int k = 0; k < 8; k++) wide[k] = bytes[k] = zero;
            int pending = 0;
            const uint64_t *xp = x + pixel_offsets[p];
            for (int64_t i = 0; i < n_words; i++) {
                const __m256i a = _mm256_set1_epi64x((long long)xp[word_offsets[i]]);
                const uint64_t *wr = w + i * 64 + half * 32;
                for (int k = 0; k < 8; k++) {
                    const __m256i v = _mm256_xor_si256(
                        a, _mm256_loadu_si256((const __m256i *)(wr + 4 * k)));
                    const __m256i lo = _mm256_and_si256(v, low_nibbles);
                    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(v, 4), low_nibbles);
                    bytes[k] = _mm256_add_epi8(
                        bytes[k], _mm256_add_epi8(_mm256_shuffle_epi8(table, lo),
                                                  _mm256_shuffle_epi8(table, hi)));
                }
                if (++pending == 31) { /* 31 * 8 = 248: one more step could wrap a byte */
                    for (int k = 0; k < 8; k++) {
                        wide[k] = _mm256_add_epi64(wide[k], _mm256_sad_epu8(bytes[k], zero));
                        bytes[k] = zero;
                    }
                    pending = 0;
                }
            }
            for (int k = 0; k < 8; k++) {
                const __m256i total = _mm256_add_epi64(wide[k], _mm256_sad_epu8(bytes[k], zero));
                int64_t lanes[4];
                _mm256_storeu_si256((__m256i *)lanes, total);
                for (int i = 0; i < 4; i++) acc[p * 64 + half * 32 + 4 * k + i] = (int32_t)lanes[i];
            }
        }
    }
}

#include "kernel_body.h"
