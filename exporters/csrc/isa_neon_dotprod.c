/* NEON with the dot-product extension: isa_neon.c compiled with UDOT accumulation. */
#define BF_DOTPROD 1
#include "isa_neon.c"
