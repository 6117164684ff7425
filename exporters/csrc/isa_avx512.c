/* x86-64 AVX-512 with VPOPCNTDQ: one 512-bit popcount covers 8 output channels.
 *
 * Three output pixels share every weight load: 24 zmm accumulators (3 pixels x 64 channels),
 * 3 broadcast input words and one weight register fit in the 32 zmm registers, so the inner
 * loop is loads + VPXORQ + VPOPCNTQ + VPADDQ with nothing spilled. */
#include <immintrin.h>
#include <stdint.h>

#include "internal.h"

#define BF_ISA avx512
#define BF_PX 3

static inline __attribute__((always_inline)) void bf_micro_n(
    const int npx, const uint64_t *x, const int64_t *pixel_offsets, const int64_t *word_offsets,
    int64_t n_words, const uint64_t *w, int32_t *acc) {
    __m512i sums[BF_PX][8];
    for (int p = 0; p < npx; p++)
        for (int k = 0; k < 8; k++) sums[p][k] = _mm512_setzero_si512();
    const uint64_t *xs[BF_PX];
    for (int p = 0; p < npx; p++) xs[p] = x + pixel_offsets[p];
    for (int64_t i = 0; i < n_words; i++) {
        const int64_t offset = word_offsets[i];
        __m512i a[BF_PX];
        for (int p = 0; p < npx; p++) a[p] = _mm512_set1_epi64((long long)xs[p][offset]);
        const uint64_t *wr = w + i * 64;
        for (int k = 0; k < 8; k++) {
            const __m512i wk = _mm512_loadu_si512((const void *)(wr + 8 * k));
            for (int p = 0; p < npx; p++)
                sums[p][k] = _mm512_add_epi64(sums[p][k],
                                              _mm512_popcnt_epi64(_mm512_xor_si512(a[p], wk)));
        }
    }
    for (int p = 0; p < npx; p++)
        for (int k = 0; k < 8; k++)
            _mm256_storeu_si256((__m256i *)(acc + p * 64 + 8 * k),
                                _mm512_cvtepi64_epi32(sums[p][k]));
}

static void bf_micro(int npx, const uint64_t *x, const int64_t *pixel_offsets,
                     const int64_t *word_offsets, int64_t n_words, const uint64_t *w,
                     int32_t *acc) {
    /* constant pixel counts, so each copy is fully unrolled with its accumulators in registers */
    switch (npx) {
    case 3: bf_micro_n(3, x, pixel_offsets, word_offsets, n_words, w, acc); break;
    case 2: bf_micro_n(2, x, pixel_offsets, word_offsets, n_words, w, acc); break;
    default: bf_micro_n(1, x, pixel_offsets, word_offsets, n_words, w, acc); break;
    }
}

/* Transpose 16 rows of 16 floats in registers: four stages swap the off-diagonal blocks of
 * 8, 4, 2 and 1 elements: for the row pair (a, a + s) lane k of the new a is a[k] or b[k - s]
 * and of the new b a[k + s] or b[k], whichever has bit s of k clear. One two-source permute per
 * row and stage, written out (constant indices) so every row stays in a register. */
static const int32_t bf_swap_index[4][2][16] __attribute__((aligned(64))) = {
    {{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
     {8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31}},
    {{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
     {4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31}},
    {{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
     {2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31}},
    {{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
     {1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31}},
};

#define BF_SWAP(a, b, lo, hi)                                                                      \
    do {                                                                                           \
        const __m512 ra_ = (a), rb_ = (b);                                                         \
        (a) = _mm512_permutex2var_ps(ra_, (lo), rb_);                                              \
        (b) = _mm512_permutex2var_ps(ra_, (hi), rb_);                                              \
    } while (0)

static inline __attribute__((always_inline)) void bf_transpose16(__m512 *r) {
    __m512i lo, hi;
    lo = _mm512_load_si512((const void *)bf_swap_index[0][0]);
    hi = _mm512_load_si512((const void *)bf_swap_index[0][1]);
    BF_SWAP(r[0], r[8], lo, hi); BF_SWAP(r[1], r[9], lo, hi); BF_SWAP(r[2], r[10], lo, hi); BF_SWAP(r[3], r[11], lo, hi);
    BF_SWAP(r[4], r[12], lo, hi); BF_SWAP(r[5], r[13], lo, hi); BF_SWAP(r[6], r[14], lo, hi); BF_SWAP(r[7], r[15], lo, hi);
    lo = _mm512_load_si512((const void *)bf_swap_index[1][0]);
    hi = _mm512_load_si512((const void *)bf_swap_index[1][1]);
    BF_SWAP(r[0], r[4], lo, hi); BF_SWAP(r[1], r[5], lo, hi); BF_SWAP(r[2], r[6], lo, hi); BF_SWAP(r[3], r[7], lo, hi);
    BF_SWAP(r[8], r[12], lo, hi); BF_SWAP(r[9], r[13], lo, hi); BF_SWAP(r[10], r[14], lo, hi); BF_SWAP(r[11], r[15], lo, hi);
    lo = _mm512_load_si512((const void *)bf_swap_index[2][0]);
    hi = _mm512_load_si512((const void *)bf_swap_index[2][1]);
    BF_SWAP(r[0], r[2], lo, hi); BF_SWAP(r[1], r[3], lo, hi); BF_SWAP(r[4], r[6], lo, hi); BF_SWAP(r[5], r[7], lo, hi);
    BF_SWAP(r[8], r[10], lo, hi); BF_SWAP(r[9], r[11], lo, hi); BF_SWAP(r[12], r[14], lo, hi); BF_SWAP(r[13], r[15], lo, hi);
    lo = _mm512_load_si512((const void *)bf_swap_index[3][0]);
    hi = _mm512_load_si512((const void *)bf_swap_index[3][1]);
    BF_SWAP(r[0], r[1], lo, hi); BF_SWAP(r[2], r[3], lo, hi); BF_SWAP(r[4], r[5], lo, hi); BF_SWAP(r[6], r[7], lo, hi);
    BF_SWAP(r[8], r[9], lo, hi); BF_SWAP(r[10], r[11], lo, hi); BF_SWAP(r[12], r[13], lo, hi); BF_SWAP(r[14], r[15], lo, hi);
}

/* The tile store of kernel_body.h, 16 x 16 blocks at a time: a scalar transpose cost as much as
 * the whole convolution on wide, shallow layers (56x56x64). Tile rows past seg_len are read
 * (the tile always has BF_SEGMENT rows) but masked off when stored. */
static void bf_store_tile_avx512(const float *tile, int64_t seg_len, int64_t n_out, float *dst,
                                 const float *res, int64_t stride) {
    for (int64_t i0 = 0; i0 < seg_len; i0 += 16) {
        const int n = (int)(seg_len - i0 < 16 ? seg_len - i0 : 16);
        const __mmask16 mask = (__mmask16)((1u << n) - 1u);
        for (int64_t j0 = 0; j0 < n_out; j0 += 16) {
            __m512 r[16];
#pragma GCC unroll 16
            for (int k = 0; k < 16; k++) r[k] = _mm512_loadu_ps(tile + (i0 + k) * 64 + j0);
            bf_transpose16(r);
            const int m = (int)(n_out - j0 < 16 ? n_out - j0 : 16);
            if (n == 16) { /* plain stores: masked ones are slow on some cores (Zen 4) */
                for (int k = 0; k < m; k++) {
                    const int64_t at = (j0 + k) * stride + i0;
                    __m512 v = r[k];
                    if (res) v = _mm512_add_ps(v, _mm512_loadu_ps(res + at));
                    _mm512_storeu_ps(dst + at, v);
                }
                continue;
            }
            for (int k = 0; k < m; k++) {
                const int64_t at = (j0 + k) * stride + i0;
                __m512 v = r[k];
                if (res) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, res + at));
                _mm512_mask_storeu_ps(dst + at, mask, v);
            }
        }
    }
}
#define BF_STORE_TILE bf_store_tile_avx512

/* ---------------------------------------------------------------- pixels in the lanes
 *
 * Stride-1 rows can also run the other way round: activations packed planar, one plane of
 * words per 64 channels, (N, cin_words, Hp, Wp), so 8 neighbouring output pixels read 8
 * consecutive words at every tap. A lane then holds a pixel instead of a channel: each weight
 * word is broadcast against 8 pixels, and the sums of one channel come out pixel-contiguous,
 * ready for the NCHW row with no transpose. Same 3 instructions per 8 sums as above, but
 * no tile, no transpose, no 64-channel-strided stores. */
#define BF_PLANAR 1

static inline int bf_planar_suits(const bf_conv *conv, int64_t out_w) {
    return conv->stride_w == 1 && out_w >= 8;
}

#include "kernel_body.h"

enum { BF_GROUPS = 3 }; /* vectors of 8 pixels per chunk: 3 x 8 channels = 24 accumulators */

/* Sums, epilogue and stores of 8 channels (first_channel.. of the block) x up to 8 * groups
 * pixels of one output row; `valid` of those pixels exist (the rest are computed on whatever
 * words follow the row and never stored). */
static inline __attribute__((always_inline)) void bf_planar_chunk(
    const int groups, const BF_LOCAL(conv_job) *job, const uint64_t *x, const uint64_t *w,
    const float *scale, const float *shift, int64_t channels, int64_t valid, float *out,
    const float *res) {
    const int64_t plane = job->out_h * job->out_w;
    __m512i sums[BF_GROUPS][8];
    for (int g = 0; g < groups; g++)
        for (int j = 0; j < 8; j++) sums[g][j] = _mm512_setzero_si512();
    for (int64_t i = 0; i < job->n_words; i++) {
        const uint64_t *xs = x + job->word_offsets[i];
        __m512i pixels[BF_GROUPS];
        for (int g = 0; g < groups; g++)
            pixels[g] = _mm512_loadu_si512((const void *)(xs + 8 * g));
        const uint64_t *wr = w + i * BF_BLOCK;
        for (int j = 0; j < 8; j++) {
            const __m512i wj = _mm512_set1_epi64((long long)wr[j]);
            for (int g = 0; g < groups; g++)
                sums[g][j] = _mm512_add_epi64(
                    sums[g][j], _mm512_popcnt_epi64(_mm512_xor_si512(pixels[g], wj)));
        }
    }
    const __m512i k_bits = _mm512_set1_epi64(job->k_bits);
    for (int j = 0; j < 8 && j < channels; j++) {
        /* scale * (K - 2 * popcount) + shift: the same float operations as kernel_body.h */
        const __m256 mul = _mm256_set1_ps(scale[j]), add = _mm256_set1_ps(shift[j]);
        for (int g = 0; g < groups; g++) {
            const int64_t lanes = valid - 8 * g;
            if (lanes <= 0) break;
            const __m512i dot =
                _mm512_sub_epi64(k_bits, _mm512_add_epi64(sums[g][j], sums[g][j]));
            __m256 v = _mm256_add_ps(_mm256_mul_ps(_mm512_cvtepi64_ps(dot), mul), add);
            const int64_t at = j * plane + 8 * g;
            if (lanes >= 8) {
                if (res) v = _mm256_add_ps(v, _mm256_loadu_ps(res + at));
                _mm256_storeu_ps(out + at, v);
            } else {
                const __mmask8 mask = (__mmask8)((1u << lanes) - 1u);
                if (res) v = _mm256_add_ps(v, _mm256_maskz_loadu_ps(mask, res + at));
                _mm256_mask_storeu_ps(out + at, mask, v);
            }
        }
    }
}

/* One unit = (image, output row, block of 64 output channels), as conv_unit. */
static void BF_LOCAL(planar_unit)(void *ctx, int64_t unit) {
    const BF_LOCAL(conv_job) *job = ctx;
    const bf_conv *conv = job->conv;
    const bf_unit_place place = BF_LOCAL(place)(job, unit);
    const int64_t img = place.img, yo = place.yo, blk = place.blk, co0 = place.co0;
    const int64_t n_out = place.n_out;
    const uint64_t *x = job->packed + img * conv->cin_words * job->padded_h * job->padded_w +
                        yo * conv->stride_h * job->padded_w;
    const int64_t at = ((img * conv->out_channels + co0) * job->out_h + yo) * job->out_w;
    const int64_t plane = job->out_h * job->out_w;
    for (int64_t c0 = 0; c0 < n_out; c0 += 8) {
        const uint64_t *w = conv->weights + blk * job->n_words * BF_BLOCK + c0;
        const float *scale = conv->multiplier + co0 + c0, *shift = conv->bias + co0 + c0;
        float *out = job->out + at + c0 * plane;
        const float *res = job->residual ? job->residual + at + c0 * plane : NULL;
        for (int64_t x0 = 0; x0 < job->out_w; x0 += 8 * BF_GROUPS) {
            const int64_t valid = job->out_w - x0;
            const int64_t left = n_out - c0;
            if (valid > 16)
                bf_planar_chunk(3, job, x + x0, w, scale, shift, left, valid, out + x0,
                                res ? res + x0 : NULL);
            else if (valid > 8)
                bf_planar_chunk(2, job, x + x0, w, scale, shift, left, valid, out + x0,
                                res ? res + x0 : NULL);
            else
                bf_planar_chunk(1, job, x + x0, w, scale, shift, left, valid, out + x0,
                                res ? res + x0 : NULL);
        }
    }
}
