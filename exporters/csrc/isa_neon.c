/* AArch64 NEON: VCNT counts the bits of each byte; the byte counts are summed pairwise.
 *
 * A q register holds 2 output channels, so a 64-channel block is done as four quarters of 16
 * channels (8 accumulators). With the dot-product extension (BF_DOTPROD, Armv8.2+: Cortex-A76
 * in the Raspberry Pi 5, the Jetson Orin's A78AE) UDOT sums four byte counts into a 32-bit
 * lane in one instruction; without it UADALP adds byte pairs into 16-bit lanes, widened
 * before they could overflow. */
#include <arm_neon.h>
#include <stdint.h>

#ifdef BF_DOTPROD
#define BF_ISA neon_dotprod
#else
#define BF_ISA neon
#endif
#define BF_PX 1

static void bf_micro(int npx, const uint64_t *x, const int64_t *pixel_offsets,
                     const int64_t *word_offsets, int64_t n_words, const uint64_t *w,
                     int32_t *acc) {
    for (int p = 0; p < npx; p++) {
        for (int quarter = 0; quarter < 4; quarter++) {
#ifdef BF_DOTPROD
            const uint8x16_t ones = vdupq_n_u8(1);
            uint32x4_t sums[8];
            for (int k = 0; k < 8; k++) sums[k] = vdupq_n_u32(0);
#else
            uint32x4_t sums[8];
            uint16x8_t pairs[8];
            for (int k = 0; k < 8; k++) {
                sums[k] = vdupq_n_u32(0);
                pairs[k] = vdupq_n_u16(0);
            }
            int pending = 0;
#endif
            const uint64_t *xp = x + pixel_offsets[p];
            for (int64_t i = 0; i < n_words; i++) {
                const uint64x2_t a = vdupq_n_u64(xp[word_offsets[i]]);
                const uint64_t *wr = w + i * 64 + quarter * 16;
                for (int k = 0; k < 8; k++) {
                    const uint8x16_t bits =
                        vcntq_u8(vreinterpretq_u8_u64(veorq_u64(a, vld1q_u64(wr + 2 * k))));
#ifdef BF_DOTPROD
                    sums[k] = vdotq_u32(sums[k], bits, ones);
#else
                    pairs[k] = vpadalq_u8(pairs[k], bits);
#endif
                }
#ifndef BF_DOTPROD
                if (++pending == 4000) { /* 16-bit lanes gain <= 16 a step: widen in time */
                    for (int k = 0; k < 8; k++) {
                        sums[k] = vpadalq_u16(sums[k], pairs[k]);
                        pairs[k] = vdupq_n_u16(0);
                    }
                    pending = 0;
                }
#endif
            }
            for (int k = 0; k < 8; k++) {
#ifndef BF_DOTPROD
                sums[k] = vpadalq_u16(sums[k], pairs[k]);
#endif
                /* lanes 0-1 belong to the first channel of the pair, lanes 2-3 to the second */
                const uint64x2_t total = vpaddlq_u32(sums[k]);
                acc[p * 64 + quarter * 16 + 2 * k] = (int32_t)vgetq_lane_u64(total, 0);
                acc[p * 64 + quarter * 16 + 2 * k + 1] = (int32_t)vgetq_lane_u64(total, 1);
            }
        }
    }
}

#include "kernel_body.h"
