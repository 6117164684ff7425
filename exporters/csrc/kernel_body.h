/* The kernels' shared body, compiled once per instruction set.
 *
 * Each isa_*.c defines, before including this file:
 *   BF_ISA    the set's name as a token (names the exported table bf_kernels_<BF_ISA>);
 *   BF_PX     how many output pixels one micro-kernel call handles at most;
 *   bf_micro  static void bf_micro(int npx, const uint64_t *x, const int64_t *pixel_offsets,
 *                                  const int64_t *word_offsets, int64_t n_words,
 *                                  const uint64_t *w, int32_t *acc)
 *             which sets acc[p * 64 + j] to sum over i < n_words of
 *             popcount(x[pixel_offsets[p] + word_offsets[i]] ^ w[i * 64 + j]) for the pixels
 *             p < npx and the block's 64 output channels j. Word i is (tap, channel word)
 *             (i / cin_words, i % cin_words): one flat loop over both, which matters for the
 *             shallow layers where a tap has a single word.
 * and may define BF_STORE_TILE as the name of its own store_tile (same contract as the plain
 * one below). The rest (packing, epilogue) are plain loops that the compiler vectorizes with the
 * set's flags (the object is only ever run on a CPU that has it).
 */
#include <stdlib.h>
#include <string.h>

#include "internal.h"

#define BF_CAT2(a, b) a##_##b
#define BF_CAT(a, b) BF_CAT2(a, b)
#define BF_LOCAL(name) BF_CAT(name, BF_ISA)

enum {
    BF_PACK_CHUNK = 1024, /* input pixels binarized per packing unit: long vectors, many units */
    BF_SEGMENT = 64       /* output pixels per epilogue tile: 16 KB of floats, stays in L1 */
};

/* ------------------------------------------------------------------------------ packing */

typedef struct {
    const float *x;
    int64_t channels, height, width;
    int64_t pad_top, pad_left, padded_h, padded_w;
    int64_t cin_words, n_chunks;
    int planar; /* 0: NHWC words (N, Hp, Wp, cin_words); 1: planar (N, cin_words, Hp, Wp) */
    uint64_t *out;
} BF_LOCAL(pack_job);

/* One unit = (image, channel word, chunk of pixels): OR the sign bits of up to 64 channel
 * planes into a flat word buffer, four planes per pass (fewer buffer loads and stores), then
 * scatter the words to their NHWC (or planar) places. bit = x < 0, the packed format's sign bit: -0.0 and
 * NaN give 0 like the Python reference. */
static void BF_LOCAL(pack_unit)(void *ctx, int64_t unit) {
    const BF_LOCAL(pack_job) *job = ctx;
    const int64_t plane = job->height * job->width;
    const int64_t chunk = unit % job->n_chunks;
    const int64_t word = (unit / job->n_chunks) % job->cin_words;
    const int64_t img = unit / (job->n_chunks * job->cin_words);
    const int64_t p0 = chunk * BF_PACK_CHUNK;
    const int64_t len = (plane - p0 < BF_PACK_CHUNK) ? plane - p0 : BF_PACK_CHUNK;
    const int64_t c0 = word * 64;
    const int n_bits = (int)((job->channels - c0 < 64) ? job->channels - c0 : 64);
    uint64_t acc[BF_PACK_CHUNK];
    memset(acc, 0, sizeof(uint64_t) * (size_t)len);
    const float *base = job->x + (img * job->channels + c0) * plane + p0;
    int b = 0;
    for (; b + 4 <= n_bits; b += 4) {
        const float *restrict s0 = base + (int64_t)b * plane;
        const float *restrict s1 = s0 + plane;
        const float *restrict s2 = s1 + plane;
        const float *restrict s3 = s2 + plane;
        for (int64_t i = 0; i < len; i++) {
            acc[i] |= ((uint64_t)(s0[i] < 0.0f) << b) | ((uint64_t)(s1[i] < 0.0f) << (b + 1)) |
                      ((uint64_t)(s2[i] < 0.0f) << (b + 2)) |
                      ((uint64_t)(s3[i] < 0.0f) << (b + 3));
        }
    }
    for (; b < n_bits; b++) {
        const float *restrict s = base + (int64_t)b * plane;
        for (int64_t i = 0; i < len; i++) acc[i] |= (uint64_t)(s[i] < 0.0f) << b;
    }
    int64_t y = p0 / job->width, xx = p0 % job->width;
    if (job->planar) {
        uint64_t *plane_out = job->out + (img * job->cin_words + word) * job->padded_h * job->padded_w;
        for (int64_t i = 0; i < len;) {
            const int64_t run = (job->width - xx < len - i) ? job->width - xx : len - i;
            memcpy(plane_out + (y + job->pad_top) * job->padded_w + xx + job->pad_left, acc + i,
                   sizeof(uint64_t) * (size_t)run);
            i += run;
            xx = 0;
            y++;
        }
        return;
    }
    for (int64_t i = 0; i < len; i++) {
        job->out[((img * job->padded_h + y + job->pad_top) * job->padded_w + xx + job->pad_left) *
                     job->cin_words +
                 word] = acc[i];
        if (++xx == job->width) {
            xx = 0;
            y++;
        }
    }
}

static void BF_LOCAL(pack_layout)(int threads, const float *x, int64_t n, int64_t channels,
                                  int64_t height, int64_t width, int64_t pad_top,
                                  int64_t pad_left, int64_t padded_h, int64_t padded_w,
                                  int planar, uint64_t *out) {
    const int64_t cin_words = (channels + 63) / 64;
    const int64_t plane = height * width;
    BF_LOCAL(pack_job) job = {x,
                              channels,
                              height,
                              width,
                              pad_top,
                              pad_left,
                              padded_h,
                              padded_w,
                              cin_words,
                              (plane + BF_PACK_CHUNK - 1) / BF_PACK_CHUNK,
                              planar,
                              out};
    /* the border stays 0 (= +1): clear everything, the units overwrite the interior */
    memset(out, 0, sizeof(uint64_t) * (size_t)(n * padded_h * padded_w * cin_words));
    if (plane == 0) return;
    bf_parallel_for(threads, n * cin_words * job.n_chunks, BF_LOCAL(pack_unit), &job);
}

static void BF_LOCAL(pack)(int threads, const float *x, int64_t n, int64_t channels,
                           int64_t height, int64_t width, int64_t pad_top, int64_t pad_left,
                           int64_t padded_h, int64_t padded_w, uint64_t *out) {
    BF_LOCAL(pack_layout)(threads, x, n, channels, height, width, pad_top, pad_left, padded_h,
                          padded_w, 0, out);
}

/* ------------------------------------------------------------------------- convolution */

typedef struct {
    const bf_conv *conv;
    const uint64_t *packed;
    const float *residual;
    float *out;
    int64_t padded_h, padded_w, out_h, out_w, k_bits, n_words;
    const int64_t *word_offsets;
} BF_LOCAL(conv_job);

/* Where a unit (image, output row, block of 64 output channels) of a convolution job lies. */
typedef struct {
    int64_t img, yo, blk, co0;
    int64_t n_out; /* channels of this block that exist (the last block may be partial) */
} bf_unit_place;

static inline bf_unit_place BF_LOCAL(place)(const BF_LOCAL(conv_job) *job, int64_t unit) {
    const bf_conv *conv = job->conv;
    bf_unit_place at;
    at.blk = unit % conv->n_blocks;
    const int64_t row = unit / conv->n_blocks;
    at.img = row / job->out_h;
    at.yo = row % job->out_h;
    at.co0 = at.blk * BF_BLOCK;
    at.n_out = (conv->out_channels - at.co0 < BF_BLOCK) ? conv->out_channels - at.co0 : BF_BLOCK;
    return at;
}

#ifdef BF_PLANAR
/* A set may bring a second convolution over the planar layout (see its isa_*.c): called per
 * (image, output row, block) unit like conv_unit, used where bf_planar_suits says so. */
static void BF_LOCAL(planar_unit)(void *ctx, int64_t unit);
#endif

#ifndef BF_STORE_TILE
/* Transpose a pixel-major tile (tile[i * 64 + j], i < seg_len pixels) into n_out channel rows
 * dst[j * stride + i], adding res likewise when it is not NULL. */
static void BF_LOCAL(store_tile)(const float *tile, int64_t seg_len, int64_t n_out, float *dst,
                                 const float *res, int64_t stride) {
    for (int64_t j = 0; j < n_out; j++) {
        float *restrict row = dst + j * stride;
        if (res) {
            const float *restrict add = res + j * stride;
            for (int64_t i = 0; i < seg_len; i++) row[i] = tile[i * BF_BLOCK + j] + add[i];
        } else {
            for (int64_t i = 0; i < seg_len; i++) row[i] = tile[i * BF_BLOCK + j];
        }
    }
}
#define BF_STORE_TILE BF_LOCAL(store_tile)
#endif

/* One unit = (image, output row, block of 64 output channels). The block's weights are reused
 * from L1 by every pixel of the row; per segment of BF_SEGMENT pixels the epilogue fills a
 * pixel-major tile which is then transposed into the NCHW output rows (adding the residual). */
static void BF_LOCAL(conv_unit)(void *ctx, int64_t unit) {
    const BF_LOCAL(conv_job) *job = ctx;
    const bf_conv *conv = job->conv;
    const bf_unit_place place = BF_LOCAL(place)(job, unit);
    const int64_t img = place.img, yo = place.yo, blk = place.blk, co0 = place.co0;
    const int64_t n_out = place.n_out;
    const int64_t cw = conv->cin_words;
    const uint64_t *w = conv->weights + blk * job->n_words * BF_BLOCK;
    const float *scale = conv->multiplier + co0;
    const float *shift = conv->bias + co0;
    const int64_t row_base = (img * job->padded_h + yo * conv->stride_h) * job->padded_w;
    const int32_t k_bits = (int32_t)job->k_bits; /* < 2^31: checked by bf_conv2d */
    float tile[BF_SEGMENT * BF_BLOCK];
    int32_t acc[BF_PX * BF_BLOCK];
    int64_t offsets[BF_PX];
    for (int64_t seg = 0; seg < job->out_w; seg += BF_SEGMENT) {
        const int64_t seg_len = (job->out_w - seg < BF_SEGMENT) ? job->out_w - seg : BF_SEGMENT;
        for (int64_t xo = 0; xo < seg_len; xo += BF_PX) {
            const int npx = (int)((seg_len - xo < BF_PX) ? seg_len - xo : BF_PX);
            for (int p = 0; p < npx; p++)
                offsets[p] = (row_base + (seg + xo + p) * conv->stride_w) * cw;
            bf_micro(npx, job->packed, offsets, job->word_offsets, job->n_words, w, acc);
            for (int p = 0; p < npx; p++) {
                float *restrict dst = tile + (xo + p) * BF_BLOCK;
                const int32_t *restrict src = acc + p * BF_BLOCK;
                for (int j = 0; j < BF_BLOCK; j++)
                    dst[j] = scale[j] * (float)(k_bits - 2 * src[j]) + shift[j];
            }
        }
        const int64_t at = ((img * conv->out_channels + co0) * job->out_h + yo) * job->out_w + seg;
        BF_STORE_TILE(tile, seg_len, n_out, job->out + at,
                      job->residual ? job->residual + at : NULL, job->out_h * job->out_w);
    }
}

static int BF_LOCAL(conv2d)(const bf_conv *conv, int threads, const float *x, int64_t n,
                            int64_t height, int64_t width, const float *residual, float *out) {
    const int64_t padded_h = height + conv->pad_top + conv->pad_bottom;
    const int64_t padded_w = width + conv->pad_left + conv->pad_right;
    const int64_t out_h = bf_conv_output_size(height, conv->kernel_h, conv->stride_h,
                                              conv->pad_top, conv->pad_bottom, conv->dilation_h);
    const int64_t out_w = bf_conv_output_size(width, conv->kernel_w, conv->stride_w,
                                              conv->pad_left, conv->pad_right, conv->dilation_w);
    if (out_h < 1 || out_w < 1) return BF_ERR_ARG;
    const int64_t cw = conv->cin_words;
    const int64_t n_taps = conv->kernel_h * conv->kernel_w;
#ifdef BF_PLANAR
    const int planar = bf_planar_suits(conv, out_w);
#else
    const int planar = 0;
#endif
    /* the planar kernel reads whole vectors of pixels past a row's end: room for the last */
    const size_t packed_words = (size_t)(n * padded_h * padded_w * cw) + (planar ? 64 : 0);
    /* 64-byte aligned, rounded up to whole lines as aligned_alloc requires */
    const size_t packed_bytes = (packed_words * sizeof(uint64_t) + 63) & ~(size_t)63;
    uint64_t *packed = aligned_alloc(64, packed_bytes ? packed_bytes : 64);
    int64_t *words = malloc(sizeof(int64_t) * (size_t)(n_taps * cw));
    if (!packed || !words) {
        free(packed);
        free(words);
        return BF_ERR_NOMEM;
    }
    for (int64_t ky = 0; ky < conv->kernel_h; ky++)
        for (int64_t kx = 0; kx < conv->kernel_w; kx++)
            for (int64_t c = 0; c < cw; c++) {
                const int64_t tap = ky * conv->dilation_h * padded_w + kx * conv->dilation_w;
                words[(ky * conv->kernel_w + kx) * cw + c] =
                    planar ? c * padded_h * padded_w + tap : tap * cw + c;
            }
    if (planar) memset(packed + packed_words - 64, 0, 64 * sizeof(uint64_t));
    BF_LOCAL(pack_layout)(threads, x, n, conv->in_channels, height, width, conv->pad_top,
                          conv->pad_left, padded_h, padded_w, planar, packed);
    BF_LOCAL(conv_job) job = {conv,  packed, residual, out, padded_h, padded_w, out_h, out_w,
                              conv->in_channels * n_taps,   n_taps * cw,    words};
#ifdef BF_PLANAR
    if (planar) {
        bf_parallel_for(threads, n * out_h * conv->n_blocks, BF_LOCAL(planar_unit), &job);
    } else
#endif
        bf_parallel_for(threads, n * out_h * conv->n_blocks, BF_LOCAL(conv_unit), &job);
    free(packed);
    free(words);
    return 0;
}

const bf_kernels BF_CAT(bf_kernels, BF_ISA) = {BF_LOCAL(pack), BF_LOCAL(conv2d)};
